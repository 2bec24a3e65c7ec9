//! The authenticated, encrypted channel between source and target.
//!
//! A Noise handshake (`Noise_NNpsk0_25519_AESGCM_SHA256`, the `snow` crate)
//! authenticates both ends: each mixes a key derived from the migration secret into
//! it, so a peer without the secret fails the handshake, before either side reads
//! any VM state. The handshake also gives fresh ephemeral keys (forward secrecy) and
//! binds the cleartext preamble the source sent first (the Noise prologue).
//!
//! After the handshake the transport is Noise's own, run on `ring` with the two
//! keys the handshake splits into (one per direction): AES-256-GCM, the nonce a
//! per-direction message counter (4 zero bytes, then the counter as u64 BE), as
//! Noise's CipherState does. What differs is only the framing, which Noise leaves
//! to the application: on the socket a message is
//! `length: u32 LE | ciphertext | tag (16 bytes)`, the length bytes being the
//! message's associated data, and a message may carry up to [`MAX_MESSAGE`] bytes
//! rather than Noise's 65535. That lets a run of guest pages travel as one message
//! that is encrypted where it lies and decrypted where it belongs: the source seals
//! its copy of the pages in place, the target receives the ciphertext straight into
//! guest memory and opens it there. (`snow`'s transport copies every message once
//! more on each side: 0.2 CPU-seconds per GiB here.)
//!
//! Readers see a byte stream: `Read` and `Write` work across message boundaries.
//! A read whose buffer holds the whole next message decrypts into that buffer.

use std::io::{IoSlice, Read, Write};
use std::net::TcpStream;

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, Tag, UnboundKey};
use sha2::{Digest, Sha256};

const PATTERN: &str = "Noise_NNpsk0_25519_AESGCM_SHA256";
/// Handshake messages are about 50 bytes; this is Noise's limit.
const HANDSHAKE_MAX: usize = 65535;
const TAG: usize = 16;
/// The largest message either side accepts (plaintext bytes). A run of pages is
/// at most 1 MiB.
pub const MAX_MESSAGE: usize = 4 << 20;
/// Bytes written through `Write` are sealed in messages of at most this size.
const STREAM_CHUNK: usize = 64 << 10;
/// Sealed messages are written out once this many bytes wait.
const SEALED_LIMIT: usize = 256 << 10;
/// The socket reader's buffer. Small on purpose: it holds the short messages (frame
/// headers) and the first bytes of the next one; the rest of a large message is read
/// straight into its destination.
const READ_BUFFER: usize = 16 << 10;

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

fn send_handshake(stream: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
    let mut framed = Vec::with_capacity(2 + msg.len());
    framed.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    framed.extend_from_slice(msg);
    stream.write_all(&framed)
}

fn recv_handshake(stream: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut len = [0u8; 2];
    stream.read_exact(&mut len)?;
    let len = u16::from_be_bytes(len) as usize;
    stream.read_exact(&mut buf[..len])?;
    Ok(len)
}

/// One direction's key and message counter.
struct Direction {
    key: LessSafeKey,
    counter: u64,
}

impl Direction {
    fn new(key: &[u8; 32]) -> Result<Self, ChannelError> {
        let key =
            UnboundKey::new(&AES_256_GCM, key).map_err(|_| ChannelError::Authentication("bad transport key".into()))?;
        Ok(Self { key: LessSafeKey::new(key), counter: 0 })
    }

    /// The next nonce: never the same twice for a key, as the counter only grows
    /// (2^64 messages are never reached).
    fn nonce(&mut self) -> Nonce {
        let mut bytes = [0u8; NONCE_LEN];
        bytes[4..].copy_from_slice(&self.counter.to_be_bytes());
        self.counter += 1;
        Nonce::assume_unique_for_key(bytes)
    }

    /// Encrypts the next message, `body` (announced as `length`), in place.
    fn seal(&mut self, length: [u8; 4], body: &mut [u8]) -> std::io::Result<Tag> {
        let nonce = self.nonce();
        self.key
            .seal_in_place_separate_tag(nonce, Aad::from(length), body)
            .map_err(|_| std::io::Error::other("encrypting failed"))
    }

    /// Decrypts the next message, `body` (announced as `length`), in place.
    fn open(&mut self, length: [u8; 4], tag: [u8; TAG], body: &mut [u8]) -> std::io::Result<()> {
        let nonce = self.nonce();
        self.key
            .open_in_place_separate_tag(nonce, Aad::from(length), Tag::from(tag), body, 0..)
            .map(|_| ())
            .map_err(|_| damaged("a message fails authentication"))
    }
}

fn damaged(why: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, ChannelError::Decrypt(why.into()))
}

/// Writes all of `parts` with as few system calls as the socket allows.
fn write_all_vectored(w: &mut impl Write, parts: &mut [IoSlice<'_>]) -> std::io::Result<()> {
    let mut parts = parts;
    while !parts.is_empty() {
        match w.write_vectored(parts) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut parts, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// One end of an established channel: `Read` gives decrypted bytes, `Write`
/// encrypts (call `flush` to send what is buffered), `write_in_place` seals a
/// caller's buffer where it lies.
pub struct SecureStream {
    stream: TcpStream,
    reader: std::io::BufReader<TcpStream>,
    send: Direction,
    recv: Direction,
    /// Plaintext written through `Write`, not yet sealed.
    pending: Vec<u8>,
    /// Sealed messages not yet written to the socket.
    sealed: Vec<u8>,
    /// The rest of a received message a read could not take whole.
    inbox: Vec<u8>,
    inbox_pos: usize,
}

impl SecureStream {
    /// The source's end: runs the handshake over `stream`. `prologue` (what the
    /// source sent in clear before) must be what the target received.
    pub fn initiate(mut stream: TcpStream, secret: &[u8], prologue: &[u8]) -> Result<Self, ChannelError> {
        let auth = |e: snow::Error| ChannelError::Authentication(e.to_string());
        let key = psk(secret);
        let mut hs = snow::Builder::new(PATTERN.parse().map_err(auth)?)
            .prologue(prologue)
            .map_err(auth)?
            .psk(0, &key)
            .map_err(auth)?
            .build_initiator()
            .map_err(auth)?;
        let mut raw = vec![0u8; HANDSHAKE_MAX];
        let mut msg = [0u8; 256];
        let n = hs.write_message(&[], &mut msg).map_err(auth)?;
        send_handshake(&mut stream, &msg[..n])?;
        let n = recv_handshake(&mut stream, &mut raw).map_err(|e| {
            ChannelError::Authentication(format!(
                "the target closed the connection during the handshake ({e}); wrong secret?"
            ))
        })?;
        hs.read_message(&raw[..n], &mut msg).map_err(auth)?;
        let (to_target, to_source) = hs.dangerously_get_raw_split();
        Self::established(stream, &to_target, &to_source)
    }

    /// The target's end: answers the handshake on `stream`. A peer with another
    /// secret, or that sent another prologue, is refused here.
    pub fn accept(mut stream: TcpStream, secret: &[u8], prologue: &[u8]) -> Result<Self, ChannelError> {
        let auth = |e: snow::Error| ChannelError::Authentication(e.to_string());
        let key = psk(secret);
        let mut hs = snow::Builder::new(PATTERN.parse().map_err(auth)?)
            .prologue(prologue)
            .map_err(auth)?
            .psk(0, &key)
            .map_err(auth)?
            .build_responder()
            .map_err(auth)?;
        let mut raw = vec![0u8; HANDSHAKE_MAX];
        let mut msg = [0u8; 256];
        let n = recv_handshake(&mut stream, &mut raw)?;
        hs.read_message(&raw[..n], &mut msg).map_err(auth)?;
        let n = hs.write_message(&[], &mut msg).map_err(auth)?;
        send_handshake(&mut stream, &msg[..n])?;
        let (to_target, to_source) = hs.dangerously_get_raw_split();
        Self::established(stream, &to_source, &to_target)
    }

    fn established(stream: TcpStream, send: &[u8; 32], recv: &[u8; 32]) -> Result<Self, ChannelError> {
        stream.set_nodelay(true)?;
        let reader = std::io::BufReader::with_capacity(READ_BUFFER, stream.try_clone()?);
        Ok(Self {
            stream,
            reader,
            send: Direction::new(send)?,
            recv: Direction::new(recv)?,
            pending: Vec::with_capacity(STREAM_CHUNK),
            sealed: Vec::with_capacity(SEALED_LIMIT + STREAM_CHUNK + 64),
            inbox: Vec::new(),
            inbox_pos: 0,
        })
    }

    /// The underlying socket (for timeouts and shutdown).
    pub fn socket(&self) -> &TcpStream {
        &self.stream
    }

    /// Sends `data` after everything written before it, encrypting it in place:
    /// `data` holds ciphertext afterwards. Saves the copy `Write` makes.
    pub fn write_in_place(&mut self, data: &mut [u8]) -> std::io::Result<()> {
        self.seal_pending()?;
        // One message per run of pages: sealing and sending 64 KiB pieces (to keep
        // them in cache for the kernel's copy) measured slower, by the extra calls.
        for chunk in data.chunks_mut(MAX_MESSAGE) {
            let length = (chunk.len() as u32).to_le_bytes();
            let tag = self.send.seal(length, chunk)?;
            // What waits in `sealed` goes in the same system call: one write, and
            // one segment train, per run of pages rather than two.
            let mut parts =
                [IoSlice::new(&self.sealed), IoSlice::new(&length), IoSlice::new(chunk), IoSlice::new(tag.as_ref())];
            write_all_vectored(&mut self.stream, &mut parts)?;
            self.sealed.clear();
        }
        Ok(())
    }

    /// Seals what `Write` buffered into `sealed`, to go out with the next write.
    fn seal_pending(&mut self) -> std::io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let length = (self.pending.len() as u32).to_le_bytes();
        let at = self.sealed.len() + 4;
        self.sealed.extend_from_slice(&length);
        self.sealed.extend_from_slice(&self.pending);
        self.pending.clear();
        let tag = self.send.seal(length, &mut self.sealed[at..])?;
        self.sealed.extend_from_slice(tag.as_ref());
        Ok(())
    }

    /// Writes out everything sealed.
    fn send_sealed(&mut self) -> std::io::Result<()> {
        self.seal_pending()?;
        let result = self.stream.write_all(&self.sealed);
        self.sealed.clear();
        result
    }

    /// Reads the next message's length and checks it.
    fn next_length(&mut self) -> std::io::Result<[u8; 4]> {
        let mut length = [0u8; 4];
        self.reader.read_exact(&mut length)?;
        let n = u32::from_le_bytes(length) as usize;
        if n == 0 || n > MAX_MESSAGE {
            return Err(damaged(format!("a message of {n} bytes (1 to {MAX_MESSAGE} allowed)")));
        }
        Ok(length)
    }

    /// Receives the body of a message of `dest.len()` bytes straight into `dest` and
    /// decrypts it there. `dest` holds unauthenticated bytes if this fails.
    fn open_into(&mut self, length: [u8; 4], dest: &mut [u8]) -> std::io::Result<()> {
        // The reader hands over what it buffered, then reads the rest from the
        // socket into `dest` itself.
        self.reader.read_exact(dest)?;
        let mut tag = [0u8; TAG];
        self.reader.read_exact(&mut tag)?;
        self.recv.open(length, tag, dest)
    }
}

impl super::wire::FrameSink for SecureStream {
    fn write_consuming(&mut self, data: &mut [u8]) -> std::io::Result<()> {
        self.write_in_place(data)
    }
}

impl Write for SecureStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let take = buf.len().min(STREAM_CHUNK - self.pending.len());
        self.pending.extend_from_slice(&buf[..take]);
        if self.pending.len() == STREAM_CHUNK {
            self.seal_pending()?;
            if self.sealed.len() >= SEALED_LIMIT {
                self.send_sealed()?;
            }
        }
        Ok(take)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send_sealed()?;
        self.stream.flush()
    }
}

impl Read for SecureStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.inbox_pos == self.inbox.len() {
            let length = self.next_length()?;
            let n = u32::from_le_bytes(length) as usize;
            if buf.len() >= n {
                // The whole message fits: it never touches a buffer of ours.
                self.open_into(length, &mut buf[..n])?;
                return Ok(n);
            }
            let mut inbox = std::mem::take(&mut self.inbox);
            inbox.resize(n, 0);
            let result = self.open_into(length, &mut inbox);
            self.inbox = inbox;
            self.inbox_pos = 0;
            if let Err(e) = result {
                self.inbox.clear();
                return Err(e);
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

    fn pair(
        source_secret: &'static [u8],
        target_secret: &'static [u8],
    ) -> (Result<SecureStream, ChannelError>, Result<SecureStream, ChannelError>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let target =
            std::thread::spawn(move || SecureStream::accept(listener.accept().unwrap().0, target_secret, b"p"));
        let source = SecureStream::initiate(TcpStream::connect(addr).unwrap(), source_secret, b"p");
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

    #[test]
    fn another_prologue_is_refused() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let target =
            std::thread::spawn(move || SecureStream::accept(listener.accept().unwrap().0, b"k", b"DROVERMG v2"));
        let _ = SecureStream::initiate(TcpStream::connect(addr).unwrap(), b"k", b"DROVERMG v3");
        assert!(matches!(target.join().unwrap(), Err(ChannelError::Authentication(_))));
    }

    #[test]
    fn sealed_in_place_data_and_stream_bytes_arrive_in_order() {
        let (source, target) = pair(b"k", b"k");
        let (mut source, mut target) = (source.unwrap(), target.unwrap());
        let big: Vec<u8> = (0..(1 << 20) + 123).map(|i: u32| (i * 7) as u8).collect();
        let mut sealed = big.clone();
        let writer = std::thread::spawn(move || {
            source.write_all(b"head").unwrap();
            source.write_in_place(&mut sealed).unwrap();
            source.write_all(b"tail").unwrap();
            source.flush().unwrap();
            sealed
        });
        let mut head = [0u8; 4];
        target.read_exact(&mut head).unwrap();
        assert_eq!(&head, b"head");
        // A buffer of the message's size: decrypted where it lies.
        let mut got = vec![0u8; big.len()];
        assert_eq!(target.read(&mut got).unwrap(), big.len(), "one read, one message");
        assert_eq!(got, big);
        let mut tail = [0u8; 4];
        target.read_exact(&mut tail).unwrap();
        assert_eq!(&tail, b"tail");
        assert_ne!(writer.join().unwrap(), big, "the source's buffer now holds ciphertext");
    }

    #[test]
    fn a_flipped_bit_or_an_oversized_length_is_refused() {
        for damage in [|m: &mut Vec<u8>| m[10] ^= 1, |m: &mut Vec<u8>| m[..4].copy_from_slice(&u32::MAX.to_le_bytes())]
        {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            // A relay that damages the first transport message.
            let relay = std::thread::spawn(move || {
                let (mut from, _) = listener.accept().unwrap();
                let inner = TcpListener::bind("127.0.0.1:0").unwrap();
                let inner_addr = inner.local_addr().unwrap();
                let target = std::thread::spawn(move || {
                    let mut t = SecureStream::accept(inner.accept().unwrap().0, b"k", b"p").unwrap();
                    let mut buf = [0u8; 16];
                    t.read_exact(&mut buf).map(|_| buf)
                });
                let mut to = TcpStream::connect(inner_addr).unwrap();
                // Handshake both ways, untouched.
                let mut hs = [0u8; 512];
                let mut len = [0u8; 2];
                from.read_exact(&mut len).unwrap();
                let n = u16::from_be_bytes(len) as usize;
                from.read_exact(&mut hs[..n]).unwrap();
                to.write_all(&len).unwrap();
                to.write_all(&hs[..n]).unwrap();
                to.read_exact(&mut len).unwrap();
                let n = u16::from_be_bytes(len) as usize;
                to.read_exact(&mut hs[..n]).unwrap();
                from.write_all(&len).unwrap();
                from.write_all(&hs[..n]).unwrap();
                let mut message = vec![0u8; 4 + 16 + TAG];
                from.read_exact(&mut message).unwrap();
                damage(&mut message);
                to.write_all(&message).unwrap();
                target.join().unwrap()
            });
            let mut source = SecureStream::initiate(TcpStream::connect(addr).unwrap(), b"k", b"p").unwrap();
            source.write_all(&[9u8; 16]).unwrap();
            source.flush().unwrap();
            let err = relay.join().unwrap().expect_err("damage must be refused");
            assert_eq!(err.kind(), std::io::ErrorKind::InvalidData, "{err}");
            assert!(err.to_string().contains("damaged"), "{err}");
        }
    }
}
