//! What the operator watches, kept in reflector stores, and the two things built
//! on them: an overlay of the operator's own recent writes (a decision must see
//! what the previous one wrote, even before the watch brings it back), and the
//! nudges that look at waiting VMs again when capacity may have appeared.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use drover_crds::drs_rule::DRSRule;
use drover_crds::host_policy::HostPolicy;
use drover_crds::migration::VirtualMachineMigration;
use drover_crds::vm::VirtualMachine;
use futures::StreamExt;
use futures::stream::BoxStream;
use k8s_openapi::api::core::v1::Node;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;

/// The reflector stores.
#[derive(Clone)]
pub struct Stores {
    pub vms: Store<VirtualMachine>,
    pub migrations: Store<VirtualMachineMigration>,
    pub policies: Store<HostPolicy>,
    pub rules: Store<DRSRule>,
    pub nodes: Store<Node>,
    /// Set as each watch finishes its first list. (Not `Store::wait_until_ready`:
    /// its wake-up goes to one waiter only, and the controllers wait on it too.)
    listed: Arc<Listed>,
}

/// Which watches have listed once.
#[derive(Default)]
struct Listed {
    done: std::sync::atomic::AtomicUsize,
    changed: Notify,
}

/// The number of watches [`Stores`] starts.
const WATCHES: usize = 5;

/// A watch of `K` into a store: managed fields dropped (the operator never reads
/// them, and they are most of an object's size), `on_change` after every event
/// `matters` picks (one that may let a waiting VM go on).
/// The store fills as the stream is polled.
fn watch<K>(
    api: Api<K>,
    matters: fn(&watcher::Event<K>) -> bool,
    on_change: impl Fn() + Send + 'static,
    listed: Arc<Listed>,
) -> (Store<K>, BoxStream<'static, Result<K, watcher::Error>>)
where
    K: Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store();
    let mut first = true;
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .modify(|object: &mut K| object.meta_mut().managed_fields = None)
        .reflect(writer)
        .inspect(move |event| {
            if let (true, Ok(watcher::Event::InitDone)) = (first, event) {
                first = false;
                tracing::debug!("{} listed", K::kind(&()));
                listed.done.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                listed.changed.notify_waiters();
            }
            match event {
                Ok(event) if matters(event) => on_change(),
                Ok(_) => {}
                Err(e) => tracing::warn!("watch of {}: {e}", K::kind(&())),
            }
        })
        .applied_objects()
        .boxed();
    (reader, stream)
}

/// A store kept up to date in a task of its own (for kinds no controller consumes).
fn reflect<K>(
    api: Api<K>,
    on_change: impl Fn() + Send + 'static,
    listed: Arc<Listed>,
    tasks: &mut JoinSet<()>,
) -> Store<K>
where
    K: Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
{
    let (reader, mut stream) = watch(api, |_| true, on_change, listed);
    tasks.spawn(async move { while stream.next().await.is_some() {} });
    reader
}

/// The watch streams the controllers consume: what a controller reconciles and
/// what a snapshot sees come from one watch, and one copy of each object.
pub struct Streams {
    pub vms: BoxStream<'static, Result<VirtualMachine, watcher::Error>>,
    pub migrations: BoxStream<'static, Result<VirtualMachineMigration, watcher::Error>>,
    pub nodes: BoxStream<'static, Result<Node, watcher::Error>>,
}

impl Stores {
    /// Starts the watches; `poke` is called when something changed that may let a
    /// waiting VM or migration go on. The VM, migration and Node stores fill as
    /// their controllers poll the [`Streams`].
    /// The stores; the watches no controller consumes run in `tasks` (the leader's:
    /// they end with its term).
    pub fn start(
        client: &kube::Client,
        settings: &crate::settings::Settings,
        poke: Arc<Notify>,
        tasks: &mut JoinSet<()>,
    ) -> (Self, Streams) {
        let p = |poke: &Arc<Notify>| {
            let poke = poke.clone();
            move || poke.notify_one()
        };
        let listed = Arc::new(Listed::default());
        let (vms, vm_stream) = watch(settings.api(client), vm_frees_room, p(&poke), listed.clone());
        let (migrations, migration_stream) = watch(settings.api(client), migration_ended, p(&poke), listed.clone());
        let (nodes, node_stream) = watch(Api::all(client.clone()), |_| true, p(&poke), listed.clone());
        let stores = Self {
            vms,
            migrations,
            policies: reflect(Api::all(client.clone()), p(&poke), listed.clone(), tasks),
            rules: reflect(settings.api(client), p(&poke), listed.clone(), tasks),
            nodes,
            listed,
        };
        (stores, Streams { vms: vm_stream, migrations: migration_stream, nodes: node_stream })
    }

    /// Waits until every watch has listed once.
    pub async fn synced(&self) {
        loop {
            let changed = self.listed.changed.notified();
            if self.listed.done.load(std::sync::atomic::Ordering::Acquire) >= WATCHES {
                return;
            }
            changed.await;
        }
    }
}

/// A VM event that may free room: a VM deleted, or one that stopped (a Manual or
/// Halted VM that stopped lets go of its host; so does one being re-placed).
/// Status updates of running VMs (every few seconds) are not: waiting VMs are not
/// looked at again for them.
fn vm_frees_room(event: &watcher::Event<VirtualMachine>) -> bool {
    match event {
        watcher::Event::Delete(_) | watcher::Event::InitDone => true,
        watcher::Event::Apply(vm) => {
            matches!(
                vm.status.as_ref().and_then(|s| s.phase),
                Some(
                    drover_crds::vm::VmPhase::Stopped
                        | drover_crds::vm::VmPhase::Failed
                        | drover_crds::vm::VmPhase::Pending
                )
            ) && vm.status.as_ref().is_some_and(|s| s.node_name.is_some())
        }
        _ => false,
    }
}

/// A migration that ended frees its reservation on the target (or the source).
fn migration_ended(event: &watcher::Event<VirtualMachineMigration>) -> bool {
    match event {
        watcher::Event::Delete(_) | watcher::Event::InitDone => true,
        watcher::Event::Apply(m) => crate::snapshot::migration_finished(m),
        _ => false,
    }
}

/// The operator's own latest writes, newer than the stores until their watch
/// catches up. Without it, two placements made in quick succession would both
/// see a host's capacity from before either.
/// Written objects by namespace and name, with when they were written.
type Written<K> = HashMap<(String, String), (Arc<K>, std::time::Instant)>;

pub struct Overlay<K> {
    written: Mutex<Written<K>>,
    /// Decisions being written: what a write will make of the object, seen by
    /// the next decision while the write is on its way (placements are decided
    /// one at a time, written concurrently).
    intents: Mutex<HashMap<(String, String), Arc<K>>>,
}

/// How long an object the operator made stays in the overlay without its watch
/// event (it may have been deleted meanwhile; a watch delivers within milliseconds).
const CREATED_GRACE: Duration = Duration::from_secs(10);

impl<K> Default for Overlay<K> {
    fn default() -> Self {
        Self { written: Mutex::new(HashMap::new()), intents: Mutex::new(HashMap::new()) }
    }
}

/// `resourceVersion` as a number. The API calls it opaque; etcd's are increasing
/// integers, and the overlay only needs "newer than", falling back to the store's
/// copy when one does not parse.
fn version<K: Resource>(object: &K) -> Option<u64> {
    object.meta().resource_version.as_deref()?.parse().ok()
}

fn id<K: Resource>(object: &K) -> (String, String) {
    (object.meta().namespace.clone().unwrap_or_default(), object.meta().name.clone().unwrap_or_default())
}

impl<K: Resource + Clone> Overlay<K> {
    fn map(&self) -> std::sync::MutexGuard<'_, Written<K>> {
        self.written.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records what a write returned.
    pub fn remember(&self, object: K) {
        self.map().insert(id(&object), (Arc::new(object), std::time::Instant::now()));
    }

    fn intents(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Arc<K>>> {
        self.intents.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records what a write under way will make of an object.
    pub fn intend(&self, object: K) {
        self.intents().insert(id(&object), Arc::new(object));
    }

    /// The write of `object`'s intent has ended (written, or failed).
    pub fn settle(&self, object: &K) {
        self.intents().remove(&id(object));
    }

    /// The newer of `object` and the operator's own last write of it.
    pub fn newest(&self, object: Arc<K>) -> Arc<K> {
        let key = id(object.as_ref());
        if let Some(intent) = self.intents().get(&key) {
            return intent.clone();
        }
        let mut map = self.map();
        match map.get(&key) {
            Some((mine, _)) if version(mine.as_ref()) > version(object.as_ref()) => mine.clone(),
            Some(_) => {
                // The store has caught up.
                map.remove(&key);
                object
            }
            None => object,
        }
    }

    /// `objects` with the operator's newer writes in place, and the objects it
    /// made lately that the store does not show yet.
    pub fn apply(&self, objects: Vec<Arc<K>>) -> Vec<Arc<K>> {
        let seen: std::collections::HashSet<(String, String)> = objects.iter().map(|o| id(o.as_ref())).collect();
        let mut out: Vec<Arc<K>> = objects.into_iter().map(|o| self.newest(o)).collect();
        let mut map = self.map();
        map.retain(|key, (_, at)| seen.contains(key) || at.elapsed() < CREATED_GRACE);
        out.extend(map.iter().filter(|(key, _)| !seen.contains(*key)).map(|(_, (o, _))| o.clone()));
        drop(map);
        out.extend(self.intents().iter().filter(|(key, _)| !seen.contains(*key)).map(|(_, o)| o.clone()));
        out
    }
}

/// Re-examines waiting VMs (Pending, or stopped and due to start) when something
/// changed, batched: a burst of events makes one pass.
pub struct Nudger {
    poke: Arc<Notify>,
}

impl Nudger {
    /// The nudger, and the stream of VMs to look at again (for the VM controller's
    /// `reconcile_on`).
    pub fn start<W>(
        poke: Arc<Notify>,
        vms: Store<VirtualMachine>,
        waiting: W,
        tasks: &mut JoinSet<()>,
    ) -> (Self, impl futures::Stream<Item = ObjectRef<VirtualMachine>> + use<W>)
    where
        W: Fn(&VirtualMachine) -> bool + Send + 'static,
    {
        let (tx, rx) = mpsc::unbounded_channel();
        let notified = poke.clone();
        tasks.spawn(async move {
            loop {
                notified.notified().await;
                // Let a burst settle (a host's facts, its Lease and its VMs often change together).
                tokio::time::sleep(Duration::from_millis(50)).await;
                for vm in vms.state().iter().filter(|v| waiting(v)) {
                    if tx.send(ObjectRef::from_obj(vm.as_ref())).is_err() {
                        return;
                    }
                }
            }
        });
        (Self { poke }, tokio_stream_from(rx))
    }

    /// Something changed.
    pub fn poke(&self) {
        self.poke.notify_one();
    }
}

fn tokio_stream_from<T: Send + 'static>(mut rx: mpsc::UnboundedReceiver<T>) -> impl futures::Stream<Item = T> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
