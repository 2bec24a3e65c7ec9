//! The authenticated, encrypted channel between source and target: TCP carrying a
//! Noise protocol session (`Noise_NNpsk0_25519_AESGCM_SHA256`, the `snow` crate).
//! Both sides mix a key derived from the migration secret into the handshake, so a
//! peer without the secret fails the handshake — before either side reads any VM
//! state — and everything after it is encrypted and authenticated (AES-GCM) with
//! fresh ephemeral keys (forward secrecy).
//!
//! On the socket: handshake messages and then transport messages, each as
//! `length: u16 BE | bytes` (Noise's own limit is 65535 bytes per message).

use std::io::{BufRead, Read, Write};
use std::net::TcpStream;

use sha2::{Digest, Sha256};

const PATTERN: &str = "Noise_NNpsk0_25519_AESGCM_SHA256";
const MAX_MESSAGE: usize = 65535;
const TAG: usize = 16;
/// Plaintext carried per transport message.
const CHUNK: usize = MAX_MESSAGE - TAG;

/// Errors of the channel.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("peer failed authentication (wrong migration secret?): {0}")]
    Authentication(String),
    #[error("encrypted stream damaged: {0}")]
    Decrypt(String),
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
}

/// The 32-byte pre-shared key for a secret, with domain separation.
fn psk(secret: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"drover migration psk v1\0");
    h.update(secret);
    h.finalize().into()
}

fn send_message(stream: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
    let mut framed = Vec::with_capacity(2 + msg.len());
    framed.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    framed.extend_from_slice(msg);
    stream.write_all(&framed)
}

fn recv_message(stream: &mut impl Read, buf: &mut [u8; MAX_MESSAGE]) -> std::io::Result<usize> {
    let mut len = [0u8; 2];
    stream.read_exact(&mut len)?;
    let len = u16::from_be_bytes(len) as usize;
    stream.read_exact(&mut buf[..len])?;
    Ok(len)
}

/// One end of an established channel: `Read` gives decrypted bytes, `Write`
/// encrypts (call `flush` to send what is buffered).
pub struct SecureStream {
    stream: TcpStream,
    /// Buffered reads: two small reads per message otherwise (length, then body).
    reader: std::io::BufReader<TcpStream>,
    noise: snow::TransportState,
    out: Vec<u8>,
    sealed: Vec<u8>,
    inbox: Vec<u8>,
    inbox_pos: usize,
    raw: Box<[u8; MAX_MESSAGE]>,
}

impl SecureStream {
    /// The source's end: connects the handshake over `stream`.
    pub fn initiate(mut stream: TcpStream, secret: &[u8]) -> Result<Self, ChannelError> {
        let auth = |e: snow::Error| ChannelError::Authentication(e.to_string());
        let key = psk(secret);
        let mut hs = snow::Builder::new(PATTERN.parse().map_err(auth)?).psk(0, &key).map_err(auth)?.build_initiator().map_err(auth)?;
        let mut raw = Box::new([0u8; MAX_MESSAGE]);
        let mut msg = [0u8; 256];
        let n = hs.write_message(&[], &mut msg).map_err(auth)?;
        send_message(&mut stream, &msg[..n])?;
        let n = recv_message(&mut stream, &mut raw).map_err(|e| {
            ChannelError::Authentication(format!("the target closed the connection during the handshake ({e}); wrong secret?"))
        })?;
        hs.read_message(&raw[..n], &mut msg).map_err(auth)?;
        Self::established(stream, hs.into_transport_mode().map_err(auth)?, raw)
    }

    /// The target's end: answers the handshake on `stream`. A peer with another
    /// secret is refused here.
    pub fn accept(mut stream: TcpStream, secret: &[u8]) -> Result<Self, ChannelError> {
        let auth = |e: snow::Error| ChannelError::Authentication(e.to_string());
        let key = psk(secret);
        let mut hs = snow::Builder::new(PATTERN.parse().map_err(auth)?).psk(0, &key).map_err(auth)?.build_responder().map_err(auth)?;
        let mut raw = Box::new([0u8; MAX_MESSAGE]);
        let mut msg = [0u8; 256];
        let n = recv_message(&mut stream, &mut raw)?;
        hs.read_message(&raw[..n], &mut msg).map_err(auth)?;
        let n = hs.write_message(&[], &mut msg).map_err(auth)?;
        send_message(&mut stream, &msg[..n])?;
        Self::established(stream, hs.into_transport_mode().map_err(auth)?, raw)
    }

    fn established(stream: TcpStream, noise: snow::TransportState, raw: Box<[u8; MAX_MESSAGE]>) -> Result<Self, ChannelError> {
        stream.set_nodelay(true)?;
        let reader = std::io::BufReader::with_capacity(1 << 20, stream.try_clone()?);
        Ok(Self { stream, reader, noise, out: Vec::with_capacity(CHUNK), sealed: vec![0; 2 + MAX_MESSAGE], inbox: Vec::new(), inbox_pos: 0, raw })
    }

    /// The underlying socket (for timeouts and shutdown).
    pub fn socket(&self) -> &TcpStream {
        &self.stream
    }

    fn seal_and_send(&mut self, len: usize) -> std::io::Result<()> {
        let plain = std::mem::take(&mut self.out);
        let result = self.seal_and_send_from(&plain[..len]);
        self.out = plain;
        result
    }

    fn seal_and_send_from(&mut self, plain: &[u8]) -> std::io::Result<()> {
        let n = self
            .noise
            .write_message(plain, &mut self.sealed[2..])
            .map_err(|e| std::io::Error::other(format!("encrypting: {e}")))?;
        self.sealed[..2].copy_from_slice(&(n as u16).to_be_bytes());
        self.stream.write_all(&self.sealed[..2 + n])
    }
}

impl Write for SecureStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.out.is_empty() && buf.len() >= CHUNK {
            // A whole message's worth: seal it straight from the caller's buffer.
            self.seal_and_send_from(&buf[..CHUNK])?;
            return Ok(CHUNK);
        }
        let take = buf.len().min(CHUNK - self.out.len());
        self.out.extend_from_slice(&buf[..take]);
        if self.out.len() == CHUNK {
            self.seal_and_send(CHUNK)?;
            self.out.clear();
        }
        Ok(take)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if !self.out.is_empty() {
            self.seal_and_send(self.out.len())?;
            self.out.clear();
        }
        self.stream.flush()
    }
}

impl Read for SecureStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.inbox_pos == self.inbox.len() {
            let decrypt_error = |e: snow::Error| std::io::Error::new(std::io::ErrorKind::InvalidData, ChannelError::Decrypt(e.to_string()));
            // Most messages lie whole in the reader's buffer: decrypt them from
            // there, without copying them out first (a migration target reads
            // gigabytes this way).
            let buffered = self.reader.fill_buf()?;
            let whole = match buffered {
                [hi, lo, rest @ ..] if rest.len() >= usize::from(u16::from_be_bytes([*hi, *lo])) => Some(usize::from(u16::from_be_bytes([*hi, *lo]))),
                _ => None,
            };
            if let Some(n) = whole {
                let message = &buffered[2..2 + n];
                let result = if buf.len() + TAG >= n {
                    // Room for the whole message: straight into the caller's buffer.
                    self.noise.read_message(message, buf).map(Some)
                } else {
                    self.inbox.resize(MAX_MESSAGE, 0);
                    self.noise.read_message(message, &mut self.inbox).map(|plain| {
                        self.inbox.truncate(plain);
                        None
                    })
                };
                self.reader.consume(2 + n);
                match result.map_err(decrypt_error)? {
                    Some(plain) => return Ok(plain),
                    None => self.inbox_pos = 0,
                }
            } else {
                let n = recv_message(&mut self.reader, &mut self.raw)?;
                if buf.len() + TAG >= n {
                    return self.noise.read_message(&self.raw[..n], buf).map_err(decrypt_error);
                }
                self.inbox.resize(MAX_MESSAGE, 0);
                let plain = self.noise.read_message(&self.raw[..n], &mut self.inbox).map_err(decrypt_error)?;
                self.inbox.truncate(plain);
                self.inbox_pos = 0;
            }
        }
        let n = buf.len().min(self.inbox.len() - self.inbox_pos);
        buf[..n].copy_from_slice(&self.inbox[self.inbox_pos..self.inbox_pos + n]);
        self.inbox_pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn pair(source_secret: &'static [u8], target_secret: &'static [u8]) -> (Result<SecureStream, ChannelError>, Result<SecureStream, ChannelError>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let target = std::thread::spawn(move || SecureStream::accept(listener.accept().unwrap().0, target_secret));
        let source = SecureStream::initiate(TcpStream::connect(addr).unwrap(), source_secret);
        (source, target.join().unwrap())
    }

    #[test]
    fn same_secret_carries_data_both_ways() {
        let (source, target) = pair(b"s3cret", b"s3cret");
        let (mut source, mut target) = (source.unwrap(), target.unwrap());
        let data: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let sent = data.clone();
        let writer = std::thread::spawn(move || {
            source.write_all(&sent).unwrap();
            source.flush().unwrap();
            let mut reply = [0u8; 2];
            source.read_exact(&mut reply).unwrap();
            reply
        });
        let mut got = vec![0u8; data.len()];
        target.read_exact(&mut got).unwrap();
        assert_eq!(got, data);
        target.write_all(b"ok").unwrap();
        target.flush().unwrap();
        assert_eq!(&writer.join().unwrap(), b"ok");
    }

    #[test]
    fn wrong_secret_is_refused_by_the_target() {
        let (_, target) = pair(b"right", b"wrong");
        let err = target.err().expect("target must refuse");
        assert!(matches!(err, ChannelError::Authentication(_)), "{err}");
    }
}

