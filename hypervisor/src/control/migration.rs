//! Bookkeeping of the VM's outgoing migration: whether one runs, its figures for
//! the control API, its connections (so that a cancel can cut them), and the
//! point of no return after which this VMM never runs the guest again.

use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

use drover_vmm_api::api::{MigrationPhase as Phase, MigrationStatus};

use crate::Error;

/// The outgoing migration's state, shared by the migration thread and the API.
#[derive(Default)]
pub struct MigrationBook {
    status: Mutex<MigrationStatus>,
    migrating: AtomicBool,
    cancel: AtomicBool,
    sockets: Mutex<Vec<TcpStream>>,
    /// Set once a migration passed its point of no return: this VMM must never run
    /// the guest again, whatever else happens.
    handed_over: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // State stays consistent across a panicking holder: every update is one assignment.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl MigrationBook {
    /// Marks a migration to `destination` as started; refused while one runs, or
    /// once one has handed the VM over.
    pub fn begin(&self, destination: &str) -> Result<(), Error> {
        if self.migrating.swap(true, Ordering::AcqRel) {
            return Err(Error::MigrationUnderWay);
        }
        if self.handed_over.load(Ordering::Acquire) {
            self.migrating.store(false, Ordering::Release);
            return Err(Error::MigrationUnderWay);
        }
        self.cancel.store(false, Ordering::Release);
        *lock(&self.status) =
            MigrationStatus { phase: Phase::Connecting, destination: destination.to_string(), ..Default::default() };
        Ok(())
    }

    /// Updates the migration's figures.
    pub fn update(&self, f: impl FnOnce(&mut MigrationStatus)) {
        f(&mut lock(&self.status));
    }

    /// The current (or last) migration's figures.
    pub fn status(&self) -> MigrationStatus {
        lock(&self.status).clone()
    }

    /// Records a connection of the running migration (cancelling shuts them all down).
    pub fn add_socket(&self, socket: TcpStream) {
        lock(&self.sockets).push(socket);
    }

    /// Asks the running migration to stop; the VM keeps running here. Refused past
    /// the point of no return.
    pub fn cancel(&self) -> Result<(), Error> {
        if self.handed_over.load(Ordering::Acquire) {
            return Err(Error::HandedOver);
        }
        if !self.migrating.load(Ordering::Acquire) {
            return Err(Error::NoMigration);
        }
        self.cancel.store(true, Ordering::Release);
        for socket in lock(&self.sockets).iter() {
            let _ = socket.shutdown(std::net::Shutdown::Both);
        }
        Ok(())
    }

    /// Whether the running migration was cancelled.
    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Acquire)
    }

    /// The point of no return: from now on the VM must never run here again.
    pub fn commit(&self) {
        self.handed_over.store(true, Ordering::Release);
    }

    /// Whether the VM was handed over to a migration target.
    pub fn handed_over(&self) -> bool {
        self.handed_over.load(Ordering::Acquire)
    }

    /// The migration thread is done (whatever the outcome).
    pub fn finish(&self) {
        lock(&self.sockets).clear();
        self.migrating.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_migration_at_a_time_and_none_after_the_hand_over() {
        let book = MigrationBook::default();
        assert!(matches!(book.cancel(), Err(Error::NoMigration)));
        book.begin("10.0.0.2:7070").unwrap();
        assert_eq!(book.status().phase, Phase::Connecting);
        assert!(matches!(book.begin("10.0.0.3:7070"), Err(Error::MigrationUnderWay)));
        assert_eq!(book.status().destination, "10.0.0.2:7070", "the refused one changed nothing");
        book.cancel().unwrap();
        assert!(book.cancelled());
        book.finish();
        // A new migration starts afresh: not cancelled.
        book.begin("10.0.0.3:7070").unwrap();
        assert!(!book.cancelled());
        book.commit();
        assert!(book.handed_over());
        assert!(matches!(book.cancel(), Err(Error::HandedOver)));
        book.finish();
        assert!(matches!(book.begin("10.0.0.4:7070"), Err(Error::MigrationUnderWay)), "the VM is gone from here");
    }
}
