//! Opening a migration: the first connection (preamble, authenticated handshake,
//! Hello with the VM's configuration, the target's Welcome), then the other
//! lanes, each bound to this migration by its handshake.

use std::io::Write;
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use super::lanes::{Lane, wait_for};
use crate::Error;
use crate::control::VmControl;
use crate::migration::channel::SecureStream;
use crate::migration::wire::{self, Frame, Hello};

/// Connects to `destination` on `lanes` lanes with `secret`, announcing the VM
/// `control` runs; the target has welcomed it when this returns. Every
/// connection is recorded with the migration, so that a cancel can cut it.
pub fn open(control: &VmControl, destination: &str, secret: &[u8], lanes: u32) -> Result<Vec<Lane>, Error> {
    let addr = destination
        .to_socket_addrs()
        .map_err(|e| Error::Config(format!("destination {destination}: {e}")))?
        .next()
        .ok_or_else(|| Error::Config(format!("destination {destination} resolves to nothing")))?;
    let connect = || -> Result<TcpStream, Error> {
        let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .map_err(|e| Error::Migration(format!("connecting to {destination}: {e}")))?;
        tcp.set_read_timeout(Some(Duration::from_secs(30))).map_err(|e| Error::io("a migration connection", e))?;
        if let Ok(clone) = tcp.try_clone() {
            control.migration().add_socket(clone);
        }
        Ok(tcp)
    };
    let mut tcp = connect()?;
    wire::write_preamble(&mut tcp)?;
    let mut main = SecureStream::initiate(tcp, secret, &wire::preamble())?;
    let mut session = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut session)
        .map_err(|_| Error::Internal("no random numbers for the migration session".into()))?;
    let hello = Hello { version: wire::VERSION, config: control.config().clone(), lanes, session };
    wire::write_frame(&mut main, &Frame::Hello(Box::new(hello)))?;
    main.flush().map_err(|e| Error::Migration(format!("sending to the target: {e}")))?;
    // The target says whether it takes this VM before the other lanes connect.
    wait_for(&mut main, "Welcome")?;
    let mut outs = vec![Lane::new(main)];
    for index in 1..lanes {
        let mut tcp = connect()?;
        wire::write_preamble(&mut tcp)?;
        tcp.write_all(&index.to_le_bytes()).map_err(|e| Error::Migration(format!("opening lane {index}: {e}")))?;
        outs.push(Lane::new(
            SecureStream::initiate(tcp, secret, &wire::lane_prologue(&session, index))
                .map_err(|e| Error::Migration(format!("lane {index}: {e}")))?,
        ));
    }
    Ok(outs)
}
