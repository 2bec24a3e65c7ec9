//! The vCPU park/save protocol: how the VMM stops its vCPU threads outside
//! KVM_RUN, has them save their own state while they are stopped, and lets them
//! run again.
//!
//! A vCPU thread calls [`Park::pause_point`] before each KVM_RUN. While the VM is
//! paused the thread parks there, and answers save requests: only the thread that
//! runs a vCPU may touch its fd, so the state is taken by that thread and handed
//! over through this type. Requests are numbered (generations): a vCPU answers the
//! latest one it sees, and a state counts only for the pause it was taken in.
//!
//! The protocol knows nothing of KVM: the state is any `S`, the kick that gets a
//! thread out of KVM_RUN is the caller's closure, and the tests below drive it with
//! plain threads.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::Error;

/// How long `pause` waits for every vCPU to park, by default.
const PAUSE_WAIT: Duration = Duration::from_secs(5);
/// How long `save_all` waits for every vCPU's state.
const SAVE_WAIT: Duration = Duration::from_secs(10);
/// How often `pause` kicks the threads that have not parked yet.
const KICK_EVERY: Duration = Duration::from_millis(2);

/// The park/save state of a VM's vCPUs; `S` is one vCPU's saved state.
pub struct Park<S> {
    vcpus: u32,
    /// How long `pause` waits for every vCPU to park.
    pause_wait: Duration,
    paused: AtomicBool,
    /// Raised to ask parked vCPU threads for their state; answers land in `saved`.
    save_generation: AtomicU64,
    /// The save request `pause_and_save` made for the current pause (0: none).
    saved_on_pause: AtomicU64,
    saved: Mutex<Vec<Saved<S>>>,
    /// How many vCPU threads are parked now.
    parked: Mutex<u32>,
    parked_changed: Condvar,
    resumed: Condvar,
}

/// A vCPU's answer to the latest save request it saw.
struct Saved<S> {
    /// The request (`save_generation`) answered.
    generation: u64,
    /// The state, taken while this pause lasts (cleared when the vCPUs run again).
    state: Option<Result<S, String>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // State stays consistent across a panicking holder: every update is one assignment.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<S> Park<S> {
    /// The protocol for `vcpus` vCPU threads, all running.
    pub fn new(vcpus: u32) -> Self {
        Self {
            vcpus,
            pause_wait: PAUSE_WAIT,
            paused: AtomicBool::new(false),
            save_generation: AtomicU64::new(0),
            saved_on_pause: AtomicU64::new(0),
            saved: Mutex::new((0..vcpus).map(|_| Saved { generation: 0, state: None }).collect()),
            parked: Mutex::new(0),
            parked_changed: Condvar::new(),
            resumed: Condvar::new(),
        }
    }

    /// Called by vCPU thread `index` before each KVM_RUN: parks it while the VM is
    /// paused. While parked, the thread answers requests to save its state
    /// (`save_all`, `pause_and_save`) by calling `save`.
    pub fn pause_point(&self, index: u32, save: impl Fn() -> Result<S, Error>) {
        if !self.paused.load(Ordering::Acquire) {
            return;
        }
        let mut parked = lock(&self.parked);
        *parked += 1;
        self.parked_changed.notify_all();
        // `paused` is read under `parked`, which `resume` holds while it clears the
        // flag and until it has notified: a resume cannot slip between this check
        // and the wait below (no lost wake-up).
        while self.paused.load(Ordering::Acquire) {
            let wanted = self.save_generation.load(Ordering::Acquire);
            let answered = lock(&self.saved).get(index as usize).map_or(u64::MAX, |s| s.generation);
            if wanted > answered {
                // Save without holding the lock: every vCPU saves at once.
                drop(parked);
                let state = save().map_err(|e| e.to_string());
                {
                    let mut saved = lock(&self.saved);
                    // `resume` clears states under this lock: a state is kept only
                    // while the pause it was taken in lasts.
                    if let Some(slot) = saved.get_mut(index as usize) {
                        slot.generation = wanted;
                        slot.state = self.paused.load(Ordering::Acquire).then_some(state);
                    }
                }
                parked = lock(&self.parked);
                self.parked_changed.notify_all();
                continue;
            }
            parked = self.resumed.wait(parked).unwrap_or_else(|p| p.into_inner());
        }
        *parked -= 1;
    }

    /// The state of every vCPU; the VM must be paused. States the vCPUs saved as
    /// they parked (`pause_and_save`) are used as they are.
    pub fn save_all(&self) -> Result<Vec<S>, Error> {
        if !self.paused.load(Ordering::Acquire) {
            return Err(Error::State("the VM must be paused to save vCPU state".into()));
        }
        let mut parked = lock(&self.parked);
        let ready = |generation: u64| lock(&self.saved).iter().all(|s| s.generation >= generation && s.state.is_some());
        let on_pause = self.saved_on_pause.swap(0, Ordering::AcqRel);
        let generation = if on_pause != 0 && on_pause == self.save_generation.load(Ordering::Acquire) {
            // Asked for as this pause began: taken, or being taken.
            on_pause
        } else {
            self.resumed.notify_all();
            self.save_generation.fetch_add(1, Ordering::AcqRel) + 1
        };
        let deadline = Instant::now() + SAVE_WAIT;
        while !ready(generation) {
            if Instant::now() > deadline {
                return Err(Error::State(format!("vCPUs did not save their state within {} s", SAVE_WAIT.as_secs())));
            }
            parked = self
                .parked_changed
                .wait_timeout(parked, Duration::from_millis(5))
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        drop(parked);
        lock(&self.saved)
            .iter_mut()
            .enumerate()
            .map(|(i, s)| match s.state.take() {
                Some(Ok(state)) => Ok(state),
                Some(Err(e)) => Err(Error::State(format!("vCPU {i}: {e}"))),
                None => Err(Error::State(format!("vCPU {i}: no state"))),
            })
            .collect()
    }

    /// `pause`, with each vCPU saving its state as it parks, in the same wake-up:
    /// `save_all` then finds the states ready. A switch-over saves a round of
    /// vCPU wake-ups from the guest's pause (on a busy host, each is up to a
    /// scheduler tick).
    pub fn pause_and_save(&self, kick: impl Fn()) -> Result<(), Error> {
        {
            let _parked = lock(&self.parked);
            let generation = self.save_generation.fetch_add(1, Ordering::AcqRel) + 1;
            self.saved_on_pause.store(generation, Ordering::Release);
            // Threads parked already (a throttle's pause) answer too.
            self.resumed.notify_all();
        }
        self.pause(kick)
    }

    /// Whether the vCPUs are paused (or held).
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Acquire)
    }

    /// Stops every vCPU (they park outside KVM_RUN) and returns once all have.
    /// `kick` gets the threads out of KVM_RUN; it is called again every 2 ms until
    /// all have parked (a thread may be slow to get a CPU).
    pub fn pause(&self, kick: impl Fn()) -> Result<(), Error> {
        self.paused.store(true, Ordering::Release);
        let deadline = Instant::now() + self.pause_wait;
        let mut parked = lock(&self.parked);
        while *parked < self.vcpus {
            if Instant::now() > deadline {
                return Err(Error::PauseTimedOut { parked: *parked, vcpus: self.vcpus, waited: self.pause_wait });
            }
            drop(parked);
            kick();
            parked = lock(&self.parked);
            // The threads may have parked while we kicked: waiting now would miss
            // their notification and sleep the whole 2 ms.
            if *parked < self.vcpus {
                parked = self
                    .parked_changed
                    .wait_timeout(parked, KICK_EVERY)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|p| p.into_inner().0);
            }
        }
        Ok(())
    }

    /// Holds vCPU threads that have yet to start at their first pause point: a
    /// restored VM's threads start held, and run on `resume`.
    pub fn hold(&self) {
        self.paused.store(true, Ordering::Release);
    }

    /// Lets paused (or held) vCPUs run again; states saved during the pause are
    /// dropped, being stale once the vCPUs run.
    pub fn resume(&self) {
        let _parked = lock(&self.parked);
        {
            let mut saved = lock(&self.saved);
            saved.iter_mut().for_each(|s| s.state = None);
            self.saved_on_pause.store(0, Ordering::Release);
            self.paused.store(false, Ordering::Release);
        }
        self.resumed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    //! The protocol driven by plain threads standing in for vCPU threads: each
    //! loops "pause point, then run", where running is waiting until kicked (as
    //! KVM_RUN returns only on an exit or a kick) or a short spin.

    use std::sync::Arc;
    use std::sync::atomic::AtomicU32;
    use std::thread::JoinHandle;

    use super::*;

    /// What a test vCPU saves: its index and how many saves it has made so far.
    type State = (u32, u32);

    struct Vcpus {
        park: Arc<Park<State>>,
        /// Saves made by each vCPU.
        saves: Arc<Vec<AtomicU32>>,
        /// Times each vCPU ran (left its pause point).
        runs: Arc<Vec<AtomicU32>>,
        /// Kicks sent: a thread "in KVM_RUN" waits until this moves.
        kicks: Arc<(Mutex<u64>, Condvar)>,
        stop: Arc<AtomicBool>,
        threads: Vec<JoinHandle<()>>,
    }

    impl Vcpus {
        /// `n` vCPU threads; `held`: they start held, as a restored VM's do.
        fn start(n: u32, held: bool) -> Vcpus {
            let park = Arc::new(Park::new(n));
            if held {
                park.hold();
            }
            let saves: Arc<Vec<AtomicU32>> = Arc::new((0..n).map(|_| AtomicU32::new(0)).collect());
            let runs: Arc<Vec<AtomicU32>> = Arc::new((0..n).map(|_| AtomicU32::new(0)).collect());
            let kicks = Arc::new((Mutex::new(0u64), Condvar::new()));
            let stop = Arc::new(AtomicBool::new(false));
            let threads = (0..n)
                .map(|index| {
                    let (park, saves, runs, kicks, stop) =
                        (park.clone(), saves.clone(), runs.clone(), kicks.clone(), stop.clone());
                    std::thread::spawn(move || {
                        let i = index as usize;
                        while !stop.load(Ordering::Acquire) {
                            park.pause_point(index, || Ok((index, saves[i].fetch_add(1, Ordering::AcqRel) + 1)));
                            runs[i].fetch_add(1, Ordering::AcqRel);
                            // "KVM_RUN": until the next kick, or 1 ms (a guest exit).
                            let (count, kicked) = &*kicks;
                            let seen = *lock(count);
                            let _ = kicked
                                .wait_timeout_while(lock(count), Duration::from_millis(1), |c| *c == seen)
                                .unwrap_or_else(|p| p.into_inner());
                        }
                    })
                })
                .collect();
            Vcpus { park, saves, runs, kicks, stop, threads }
        }

        fn kick(&self) -> impl Fn() + '_ {
            || {
                let (count, kicked) = &*self.kicks;
                *lock(count) += 1;
                kicked.notify_all();
            }
        }

        fn pause(&self) {
            self.park.pause(self.kick()).expect("every vCPU parks");
        }

        fn saves(&self) -> Vec<u32> {
            self.saves.iter().map(|s| s.load(Ordering::Acquire)).collect()
        }

        fn runs(&self) -> Vec<u32> {
            self.runs.iter().map(|s| s.load(Ordering::Acquire)).collect()
        }

        fn parked(&self) -> u32 {
            *lock(&self.park.parked)
        }

        /// Waits (up to 10 s) until every vCPU has run past its pause point again.
        fn wait_all_ran_since(&self, before: &[u32]) {
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.runs().iter().zip(before).any(|(now, then)| now <= then) {
                assert!(Instant::now() < deadline, "vCPUs did not run again: {:?} -> {:?}", before, self.runs());
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    /// Joins a thread that must end within 10 s (one left parked fails the test
    /// rather than hanging it).
    fn join(thread: JoinHandle<()>) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !thread.is_finished() {
            assert!(Instant::now() < deadline, "a vCPU thread stayed parked");
            std::thread::sleep(Duration::from_millis(1));
        }
        thread.join().unwrap();
    }

    impl Drop for Vcpus {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Release);
            self.park.resume();
            if std::thread::panicking() {
                // A failed test may have left threads parked for good: leave them.
                return;
            }
            self.threads.drain(..).for_each(join);
        }
    }

    #[test]
    fn pause_parks_every_vcpu_and_none_runs_until_resumed() {
        let vcpus = Vcpus::start(4, false);
        vcpus.wait_all_ran_since(&[0; 4]);
        vcpus.pause();
        assert!(vcpus.park.is_paused());
        assert_eq!(vcpus.parked(), 4);
        let runs = vcpus.runs();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(vcpus.runs(), runs, "a vCPU ran while paused");
        vcpus.park.resume();
        assert!(!vcpus.park.is_paused());
        vcpus.wait_all_ran_since(&runs);
    }

    #[test]
    fn a_pause_that_cannot_complete_says_how_many_parked() {
        // Two vCPUs, one thread: the other vCPU never parks.
        let mut park: Park<State> = Park::new(2);
        park.pause_wait = Duration::from_millis(50);
        let park = Arc::new(park);
        let thread = {
            let park = park.clone();
            std::thread::spawn(move || {
                while !park.is_paused() {
                    std::thread::yield_now();
                }
                park.pause_point(0, || Ok((0, 0)));
            })
        };
        let kicks = AtomicU32::new(0);
        let err = park
            .pause(|| {
                kicks.fetch_add(1, Ordering::Relaxed);
            })
            .unwrap_err();
        assert!(matches!(err, Error::PauseTimedOut { parked: 1, vcpus: 2, .. }), "{err}");
        assert_eq!(err.to_string(), "only 1 of 2 vCPUs paused within 50 ms");
        assert!(kicks.load(Ordering::Relaxed) > 1, "the straggler was kicked again");
        park.resume();
        join(thread);
    }

    #[test]
    fn save_answers_each_request_once_per_vcpu() {
        let vcpus = Vcpus::start(3, false);
        vcpus.pause();
        let first = vcpus.park.save_all().unwrap();
        assert_eq!(first, vec![(0, 1), (1, 1), (2, 1)], "one state per vCPU, in order");
        // Another request in the same pause: a new generation, answered anew.
        let second = vcpus.park.save_all().unwrap();
        assert_eq!(second, vec![(0, 2), (1, 2), (2, 2)]);
        assert_eq!(vcpus.saves(), vec![2, 2, 2], "no vCPU saved twice for one request");
    }

    #[test]
    fn save_refuses_a_running_vm() {
        let vcpus = Vcpus::start(1, false);
        let err = vcpus.park.save_all().unwrap_err().to_string();
        assert!(err.contains("must be paused"), "{err}");
    }

    #[test]
    fn a_failed_save_names_the_vcpu() {
        let park: Arc<Park<State>> = Arc::new(Park::new(2));
        park.hold();
        let threads: Vec<_> = (0..2)
            .map(|index| {
                let park = park.clone();
                std::thread::spawn(move || {
                    park.pause_point(index, || if index == 1 { Err(Error::State("no fd".into())) } else { Ok((0, 0)) })
                })
            })
            .collect();
        park.pause(|| {}).unwrap();
        let err = park.save_all().unwrap_err().to_string();
        assert_eq!(err, "VM state: vCPU 1: VM state: no fd");
        park.resume();
        threads.into_iter().for_each(join);
    }

    #[test]
    fn pause_and_save_hands_the_states_ready() {
        let vcpus = Vcpus::start(4, false);
        vcpus.park.pause_and_save(vcpus.kick()).unwrap();
        // Every vCPU saved as it parked: the states are there before anyone asks.
        let deadline = Instant::now() + Duration::from_secs(10);
        while vcpus.saves() != vec![1; 4] {
            assert!(Instant::now() < deadline, "saves: {:?}", vcpus.saves());
            std::thread::sleep(Duration::from_millis(1));
        }
        let states = vcpus.park.save_all().unwrap();
        assert_eq!(states, (0..4).map(|i| (i, 1)).collect::<Vec<_>>());
        assert_eq!(vcpus.saves(), vec![1; 4], "save_all took the states saved on pause, no new round");
    }

    #[test]
    fn pause_and_save_while_a_throttle_holds_the_vcpus() {
        let vcpus = Vcpus::start(2, false);
        vcpus.pause();
        // Already parked (a throttle's pause): they wake up to answer.
        vcpus.park.pause_and_save(vcpus.kick()).unwrap();
        assert_eq!(vcpus.park.save_all().unwrap(), vec![(0, 1), (1, 1)]);
    }

    #[test]
    fn states_are_cleared_on_resume() {
        let vcpus = Vcpus::start(2, false);
        vcpus.park.pause_and_save(vcpus.kick()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while vcpus.saves() != vec![1; 2] {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(1));
        }
        // The switch-over failed: the VM runs again, and its saved states are stale.
        let runs = vcpus.runs();
        vcpus.park.resume();
        vcpus.wait_all_ran_since(&runs);
        assert!(lock(&vcpus.park.saved).iter().all(|s| s.state.is_none()), "stale states kept");
        vcpus.pause();
        assert_eq!(vcpus.park.save_all().unwrap(), vec![(0, 2), (1, 2)], "fresh states, taken in this pause");
    }

    #[test]
    fn held_vcpus_wait_at_their_first_pause_point_until_resumed() {
        let vcpus = Vcpus::start(3, true);
        let deadline = Instant::now() + Duration::from_secs(10);
        while vcpus.parked() < 3 {
            assert!(Instant::now() < deadline, "{} of 3 held", vcpus.parked());
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(vcpus.runs(), vec![0; 3], "a held vCPU ran");
        // Held vCPUs answer save requests too (a target saves nothing, but a
        // snapshot of a held VM could).
        assert_eq!(vcpus.park.save_all().unwrap().len(), 3);
        vcpus.park.resume();
        vcpus.wait_all_ran_since(&[0; 3]);
    }

    #[test]
    fn no_wake_up_is_lost_over_many_pauses() {
        // Pause and resume back to back: every resume must reach every parked
        // thread (a lost one would leave it parked, and the next check would
        // time out), and every pause must find every thread.
        let vcpus = Vcpus::start(3, false);
        for round in 0..300 {
            let runs = vcpus.runs();
            vcpus.pause();
            assert_eq!(vcpus.parked(), 3, "round {round}");
            if round % 3 == 0 {
                assert_eq!(vcpus.park.save_all().unwrap().len(), 3, "round {round}");
            }
            vcpus.park.resume();
            vcpus.wait_all_ran_since(&runs);
        }
    }
}
