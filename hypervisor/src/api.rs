//! The control API: HTTP/1.1 with JSON bodies on a Unix socket, as Firecracker and
//! cloud-hypervisor serve theirs. One request per connection, served in order by one
//! thread: the API is for an agent and an operator, a few requests a second at most,
//! so the server is the small loop below rather than a general HTTP stack. Its one
//! subtle point: a power-off is carried out only after its reply is written, since
//! the process ends right after.
//!
//! | request | does |
//! | --- | --- |
//! | `GET /vm` | status: state, vCPUs (thread, host CPUs, last CPU, CPU time), memory, uptime, boot time, shares |
//! | `PUT /vm/pause`, `PUT /vm/resume` | stop / restart every vCPU (the migration hooks) |
//! | `PUT /vm/shutdown` | power the VM off (exit status 0) |
//! | `PUT /vm/snapshot` `{"path": "/dir"}` | write state and memory to a directory (the VM pauses meanwhile) |
//! | `PUT /vm/migrate` `{"destination": "10.0.0.2:7070", "secretFile": "/run/drover/mig.key", "maxDowntimeMs": 30}` | live-migrate to a `drover-vmm receive` (see `migration::send::MigrateRequest`) |
//! | `GET /vm/migration` | the migration's phase, pass, bytes, dirty rate, estimated and measured downtime, total time |
//! | `PUT /vm/migration/cancel` | stop it; the VM keeps running here |
//! | `PATCH /vm/cpus` `{"hostCpus": "0-3"}` | move the running vCPUs to other host CPUs |
//! | `PATCH /vm/priority` `{"shares": 2000}` | change the running vCPUs' priority |
//!
//! The server stands outside the VMM, as Firecracker's does: it works on the
//! [`VmControl`] that `vmm::start` hands back, and `main.rs` starts it.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use drover_vmm_api::api::{self as paths, CpusPatch, MAX_BODY, MigrateRequest, PriorityPatch, SnapshotRequest};

use crate::Error;
use crate::control::VmControl;

/// The control API being served; dropping it removes the socket file (the thread
/// serving it ends with the process).
pub struct ApiServer {
    socket: PathBuf,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Starts serving the API of the VM `control` runs on `socket`, in a thread of its own.
pub fn serve(socket: &Path, control: Arc<VmControl>) -> Result<ApiServer, Error> {
    let _ = std::fs::remove_file(socket); // a stale socket of a VMM that is gone
    let listener =
        UnixListener::bind(socket).map_err(|e| Error::Io(format!("control socket {}: {e}", socket.display())))?;
    let server = ApiServer { socket: socket.to_path_buf() };
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                if let Err(e) = serve_one(stream, &control) {
                    tracing::warn!("control API connection: {e}");
                }
            }
        })
        .map_err(|e| Error::Io(format!("starting the API thread: {e}")))?;
    Ok(server)
}

/// Reads one request, answers it, closes the connection.
fn serve_one(stream: UnixStream, control: &Arc<VmControl>) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
    let mut length = 0usize;
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.trim().eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().unwrap_or(0);
        }
    }
    let (code, reply) = if length > MAX_BODY {
        (413, Some(serde_json::json!({ "error": format!("body larger than {MAX_BODY} bytes") })))
    } else {
        let mut body = vec![0; length];
        reader.read_exact(&mut body)?;
        route(&method, &path, &String::from_utf8_lossy(&body), control)
    };
    let body = reply.map(|v| v.to_string()).unwrap_or_default();
    let reason = match code {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        409 => "Conflict",
        413 => "Payload Too Large",
        _ => "Internal Server Error",
    };
    let mut stream = stream;
    write!(
        stream,
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()?;
    // The process ends soon after a power-off: answer first, or the caller would
    // see its connection close with no reply.
    if (method.as_str(), path.as_str()) == ("PUT", paths::SHUTDOWN) {
        let _ = stream.shutdown(std::net::Shutdown::Both);
        control.power_off();
    }
    Ok(())
}

/// Dispatches one request; returns the status code and the JSON reply, if any.
fn route(method: &str, path: &str, body: &str, control: &Arc<VmControl>) -> (u16, Option<serde_json::Value>) {
    let result: Result<Option<serde_json::Value>, (u16, String)> = match (method, path) {
        ("GET", paths::VM) => serde_json::to_value(control.status()).map(Some).map_err(|e| (500, e.to_string())),
        ("PUT", paths::PAUSE) => control.pause().map(|_| None).map_err(|e| (500, e.to_string())),
        ("PUT", paths::RESUME) => {
            control.resume();
            Ok(None)
        }
        ("PUT", paths::SNAPSHOT) => serde_json::from_str::<SnapshotRequest>(body)
            .map_err(|e| (400, format!("body: {e}")))
            .and_then(|r| crate::snapshot::save(control, &r.path).map_err(|e| (500, e.to_string())))
            .and_then(|info| serde_json::to_value(info).map(Some).map_err(|e| (500, e.to_string()))),
        ("PUT", paths::MIGRATE) => serde_json::from_str::<MigrateRequest>(body)
            .map_err(|e| (400, format!("body: {e}")))
            .and_then(|r| crate::migration::send::start(control.clone(), r).map_err(|e| (400, e.to_string())))
            .map(|_| None),
        ("GET", paths::MIGRATION) => {
            serde_json::to_value(control.migration_status()).map(Some).map_err(|e| (500, e.to_string()))
        }
        ("PUT", paths::MIGRATION_CANCEL) => control.cancel_migration().map(|_| None).map_err(|e| (409, e.to_string())),
        // Powering off happens after the reply is written (see serve_one).
        ("PUT", paths::SHUTDOWN) => Ok(None),
        ("PATCH", paths::CPUS) => serde_json::from_str::<CpusPatch>(body)
            .map_err(|e| (400, format!("body: {e}")))
            .and_then(|p| control.set_host_cpus(&p.host_cpus).map_err(|e| (400, e.to_string())))
            .map(|_| None),
        ("PATCH", paths::PRIORITY) => serde_json::from_str::<PriorityPatch>(body)
            .map_err(|e| (400, format!("body: {e}")))
            .and_then(|p| control.set_shares(p.shares).map_err(|e| (400, e.to_string())))
            .map(|_| None),
        (method, path) => Err((404, format!("no such request: {method} {path}"))),
    };
    match result {
        Ok(Some(json)) => (200, Some(json)),
        Ok(None) => (204, None),
        Err((code, message)) => (code, Some(serde_json::json!({ "error": message }))),
    }
}
