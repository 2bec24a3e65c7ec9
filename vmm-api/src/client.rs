//! A client of the control API: blocking, one request per connection, as the API
//! serves them. Async callers (the agent) run it on a blocking thread.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::Error;
use crate::api::{self, CpusPatch, ErrorReply, MigrateRequest, MigrationStatus, PriorityPatch, SnapshotInfo, VmStatus};

/// How long a reply may take by default. Every request but a snapshot answers in
/// milliseconds; a VMM that does not answer in this time is stuck, and its caller
/// must not be.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// A VMM's control socket.
#[derive(Clone, Debug)]
pub struct Client {
    socket: PathBuf,
    timeout: Duration,
}

impl Client {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self { socket: socket.into(), timeout: DEFAULT_TIMEOUT }
    }

    /// The same client with another reply timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends one request and returns the status code and the body, whatever the code.
    pub fn raw(&self, method: &str, path: &str, body: Option<&str>) -> Result<(u16, String), Error> {
        let socket = self.socket.display().to_string();
        let io = |source| Error::Socket { socket: socket.clone(), source };
        let mut stream = UnixStream::connect(&self.socket).map_err(io)?;
        stream.set_read_timeout(Some(self.timeout)).map_err(io)?;
        stream.set_write_timeout(Some(self.timeout)).map_err(io)?;
        let body = body.unwrap_or("");
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).map_err(io)?;
        let mut response = String::new();
        stream.read_to_string(&mut response).map_err(io)?;
        let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
        let code = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| Error::Malformed { socket: socket.clone(), head: head.to_string() })?;
        Ok((code, body.to_string()))
    }

    /// Sends one request; a code other than 2xx becomes [`Error::Refused`].
    fn call(&self, method: &str, path: &str, body: Option<String>) -> Result<String, Error> {
        let (code, reply) = self.raw(method, path, body.as_deref())?;
        if (200..300).contains(&code) {
            return Ok(reply);
        }
        let message =
            serde_json::from_str::<ErrorReply>(&reply).map(|r| r.error).unwrap_or_else(|_| reply.trim().into());
        Err(Error::Refused { request: format!("{method} {path}"), code, message })
    }

    fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, Error> {
        let reply = self.call("GET", path, None)?;
        serde_json::from_str(&reply).map_err(|source| Error::Decode { request: format!("GET {path}"), source })
    }

    fn send<B: Serialize>(&self, method: &str, path: &str, body: &B) -> Result<String, Error> {
        // Serializing these plain structs cannot fail; an empty body would be refused by the VMM.
        self.call(method, path, Some(serde_json::to_string(body).unwrap_or_default()))
    }

    pub fn status(&self) -> Result<VmStatus, Error> {
        self.get(api::VM)
    }

    pub fn migration(&self) -> Result<MigrationStatus, Error> {
        self.get(api::MIGRATION)
    }

    pub fn pause(&self) -> Result<(), Error> {
        self.call("PUT", api::PAUSE, None).map(drop)
    }

    pub fn resume(&self) -> Result<(), Error> {
        self.call("PUT", api::RESUME, None).map(drop)
    }

    /// Powers the VM off; the VMM exits right after its reply.
    pub fn shutdown(&self) -> Result<(), Error> {
        self.call("PUT", api::SHUTDOWN, None).map(drop)
    }

    /// Asks the guest to shut down (Ctrl+Alt+Del on its keyboard); the VM runs on
    /// until the guest powers off or reboots, if it does.
    pub fn ctrl_alt_del(&self) -> Result<(), Error> {
        self.call("PUT", api::CTRL_ALT_DEL, None).map(drop)
    }

    pub fn set_host_cpus(&self, host_cpus: &str) -> Result<(), Error> {
        self.send("PATCH", api::CPUS, &CpusPatch { host_cpus: host_cpus.into() }).map(drop)
    }

    pub fn set_shares(&self, shares: u32) -> Result<(), Error> {
        self.send("PATCH", api::PRIORITY, &PriorityPatch { shares }).map(drop)
    }

    pub fn snapshot(&self, dir: &Path) -> Result<SnapshotInfo, Error> {
        let reply = self.send("PUT", api::SNAPSHOT, &api::SnapshotRequest { path: dir.to_path_buf() })?;
        serde_json::from_str(&reply)
            .map_err(|source| Error::Decode { request: format!("PUT {}", api::SNAPSHOT), source })
    }

    /// Starts a live migration; it runs on in the VMM ([`Client::migration`] follows it).
    pub fn migrate(&self, request: &MigrateRequest) -> Result<(), Error> {
        self.send("PUT", api::MIGRATE, request).map(drop)
    }

    pub fn cancel_migration(&self) -> Result<(), Error> {
        self.call("PUT", api::MIGRATION_CANCEL, None).map(drop)
    }
}

/// One request to the VMM at `socket`, with the default timeout: the status code
/// and the body (`drover-vmm api`, tests).
pub fn request(socket: &Path, method: &str, path: &str, body: Option<&str>) -> Result<(u16, String), Error> {
    Client::new(socket).raw(method, path, body)
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixListener;

    use super::*;

    /// Serves one connection with a canned reply and returns the request line.
    fn serve_once(listener: UnixListener, reply: &'static str) -> std::thread::JoinHandle<String> {
        std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            let mut header = String::new();
            while reader.read_line(&mut header).unwrap() > 0 && header != "\r\n" {
                header.clear();
            }
            let mut stream = stream;
            stream.write_all(reply.as_bytes()).unwrap();
            line
        })
    }

    #[test]
    fn a_refusal_carries_its_code_and_the_vmms_message() {
        let dir = std::env::temp_dir().join(format!("drover-vmm-api-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("api.sock");
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket).unwrap();
        let server = serve_once(
            listener,
            "HTTP/1.1 409 Conflict\r\nContent-Length: 39\r\n\r\n{\"error\":\"a migration is under way\"}   ",
        );
        let e = Client::new(&socket).cancel_migration().unwrap_err();
        assert_eq!(server.join().unwrap(), "PUT /vm/migration/cancel HTTP/1.1\r\n");
        match e {
            Error::Refused { code, message, request } => {
                assert_eq!(
                    (code, message.as_str(), request.as_str()),
                    (409, "a migration is under way", "PUT /vm/migration/cancel")
                );
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_socket_is_named() {
        let e = Client::new("/nonexistent/api.sock").status().unwrap_err();
        assert!(matches!(e, Error::Socket { .. }), "{e:?}");
        assert!(e.to_string().contains("/nonexistent/api.sock"), "{e}");
    }
}
