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
//! | `PUT /vm/ctrl-alt-del` | ask the guest to shut down: type Ctrl+Alt+Del on its i8042 keyboard (IRQ 1); the guest decides what follows (409 while a migration is under way, or while it has not read the keys typed before) |
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

use drover_vmm_api::api::{self as paths, CpusPatch, MAX_BODY, PriorityPatch, SnapshotRequest};

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
        UnixListener::bind(socket).map_err(|e| Error::io(format!("control socket {}", socket.display()), e))?;
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
        .map_err(|e| Error::io("starting the API thread", e))?;
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
    let result = if length > MAX_BODY {
        Err(Error::BodyTooLarge { limit: MAX_BODY })
    } else {
        let mut body = vec![0; length];
        reader.read_exact(&mut body)?;
        route(&method, &path, &String::from_utf8_lossy(&body), control)
    };
    let (code, reply) = match result {
        Ok(Some(json)) => (200, Some(json)),
        Ok(None) => (204, None),
        Err(e) => (status_code(&e), Some(serde_json::json!({ "error": e.to_string() }))),
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

/// The status code of a refused request: the one place an error becomes a code.
/// 400: the request is wrong (its body, a value out of range); 404: no such
/// request; 409: not in the VM's present state (a migration under way, none to
/// cancel, too late to cancel, keys typed before still unread); 413: body too large; 500: the VMM failed doing it.
pub fn status_code(e: &Error) -> u16 {
    match e {
        Error::Config(_) | Error::Body(_) => 400,
        Error::NoSuchRequest { .. } => 404,
        Error::MigrationUnderWay | Error::NoMigration | Error::HandedOver | Error::KeyboardFull => 409,
        Error::BodyTooLarge { .. } => 413,
        Error::KvmOpen { .. }
        | Error::Kvm { .. }
        | Error::Kernel { .. }
        | Error::Memory(_)
        | Error::Migration(_)
        | Error::Wire(_)
        | Error::Channel(_)
        | Error::State(_)
        | Error::PauseTimedOut { .. }
        | Error::Topology(_)
        | Error::Io { .. }
        | Error::Reply(_)
        | Error::Internal(_) => 500,
    }
}

/// Dispatches one request; returns the JSON reply, if any.
fn route(method: &str, path: &str, body: &str, control: &Arc<VmControl>) -> Result<Option<serde_json::Value>, Error> {
    fn parse<'a, T: serde::Deserialize<'a>>(body: &'a str) -> Result<T, Error> {
        serde_json::from_str(body).map_err(Error::Body)
    }
    fn reply(value: impl serde::Serialize) -> Result<Option<serde_json::Value>, Error> {
        serde_json::to_value(value).map(Some).map_err(Error::Reply)
    }
    match (method, path) {
        ("GET", paths::VM) => reply(control.status()),
        ("PUT", paths::PAUSE) => control.pause().map(|()| None),
        ("PUT", paths::RESUME) => {
            control.resume();
            Ok(None)
        }
        ("PUT", paths::SNAPSHOT) => {
            let request: SnapshotRequest = parse(body)?;
            reply(crate::snapshot::save(control, &request.path)?)
        }
        ("PUT", paths::MIGRATE) => crate::migration::send::start(control.clone(), parse(body)?).map(|()| None),
        ("GET", paths::MIGRATION) => reply(control.migration_status()),
        ("PUT", paths::MIGRATION_CANCEL) => control.cancel_migration().map(|()| None),
        // Powering off happens after the reply is written (see serve_one).
        ("PUT", paths::SHUTDOWN) => Ok(None),
        ("PUT", paths::CTRL_ALT_DEL) => control.ctrl_alt_del().map(|()| None),
        ("PATCH", paths::CPUS) => control.set_host_cpus(&parse::<CpusPatch>(body)?.host_cpus).map(|()| None),
        ("PATCH", paths::PRIORITY) => control.set_shares(parse::<PriorityPatch>(body)?.shares).map(|()| None),
        (method, path) => Err(Error::NoSuchRequest { method: method.into(), path: path.into() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_gets_its_status_code() {
        let body = serde_json::from_str::<CpusPatch>("{}").unwrap_err();
        let cases = [
            (Error::Config("shares: 0 is out of range 1-10000".into()), 400),
            (Error::Body(body), 400),
            (Error::NoSuchRequest { method: "GET".into(), path: "/nope".into() }, 404),
            (Error::MigrationUnderWay, 409),
            (Error::NoMigration, 409),
            (Error::HandedOver, 409),
            (Error::KeyboardFull, 409),
            (Error::BodyTooLarge { limit: MAX_BODY }, 413),
            (Error::io("writing 500 to cpu.shares", std::io::Error::from_raw_os_error(libc::EACCES)), 500),
            (Error::PauseTimedOut { parked: 0, vcpus: 1, waited: std::time::Duration::from_secs(5) }, 500),
            (Error::State("vCPUs did not save their state within 10 s".into()), 500),
        ];
        for (error, code) in cases {
            assert_eq!(status_code(&error), code, "{error}");
        }
    }
}
