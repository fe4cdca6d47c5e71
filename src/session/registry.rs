// Process-wide registry of running sessions by name, so that a
// roboflowresultsrc in the same or another pipeline gets a sink's results.
//
// Who reads the results is decided once, when the sink starts its session: a
// result source that claimed the name before gets the result stream;
// otherwise the sink keeps it and posts the results itself.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, Weak};

use tokio::sync::oneshot;

use super::driver::Shared;
use super::endpoints::{Reader, ResultStream};
use super::error::SessionError;

#[derive(Default)]
struct Registry {
    running: HashMap<String, Weak<Shared>>,
    claims: HashMap<String, Claimant>,
}

struct Claimant {
    id: u64,
    stream: oneshot::Sender<ResultStream>,
}

static REGISTRY: LazyLock<Mutex<Registry>> = LazyLock::new(|| Mutex::new(Registry::default()));

/// A result source's claim on the results of the session called `name`,
/// which no sink has started yet. Dropping it withdraws the claim.
#[derive(Debug)]
pub struct Claim {
    name: String,
    id: u64,
    stream: oneshot::Receiver<ResultStream>,
}

impl Claim {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Resolves with the result stream once the sink starts the session;
    /// None if the claim was withdrawn. Cancel-safe.
    pub async fn stream(&mut self) -> Option<ResultStream> {
        (&mut self.stream).await.ok()
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut registry = REGISTRY.lock().unwrap();
        if registry.claims.get(&self.name).is_some_and(|claimant| claimant.id == self.id) {
            registry.claims.remove(&self.name);
        }
    }
}

/// Claims the results of session `name` for a roboflowresultsrc.
pub fn claim(name: &str) -> Result<Claim, SessionError> {
    static IDS: AtomicU64 = AtomicU64::new(0);
    let mut registry = REGISTRY.lock().unwrap();
    if registry.running.get(name).is_some_and(|session| session.strong_count() > 0) {
        return Err(SessionError::ResultsTaken { session: name.to_owned() });
    }
    if registry.claims.get(name).is_some_and(|claimant| !claimant.stream.is_closed()) {
        return Err(SessionError::ResultsClaimed { session: name.to_owned() });
    }
    let id = IDS.fetch_add(1, Ordering::Relaxed);
    let (sender, receiver) = oneshot::channel();
    registry.claims.insert(name.to_owned(), Claimant { id, stream: sender });
    Ok(Claim { name: name.to_owned(), id, stream: receiver })
}

/// Registers a starting session under its name and hands its result stream
/// to the source that claimed it; returns the stream when nobody did.
pub(super) fn register(shared: &Arc<Shared>, mut stream: ResultStream) -> Result<Option<ResultStream>, SessionError> {
    let mut registry = REGISTRY.lock().unwrap();
    registry.running.retain(|_, session| session.strong_count() > 0);
    if registry.running.contains_key(&shared.name) {
        return Err(SessionError::NameInUse { session: shared.name.clone() });
    }
    registry.running.insert(shared.name.clone(), Arc::downgrade(shared));
    let Some(claimant) = registry.claims.remove(&shared.name) else {
        return Ok(Some(stream));
    };
    stream.set_reader(Reader::ResultSource);
    match claimant.stream.send(stream) {
        Ok(()) => Ok(None),
        // The claim was withdrawn meanwhile: the sink reads the results.
        Err(mut stream) => {
            stream.set_reader(Reader::Sink);
            Ok(Some(stream))
        }
    }
}

/// Removes `shared` (only that instance: a newer session of the same name stays).
pub(super) fn unregister(shared: &Arc<Shared>) {
    let mut registry = REGISTRY.lock().unwrap();
    if registry.running.get(&shared.name).is_some_and(|session| session.as_ptr() == Arc::as_ptr(shared)) {
        registry.running.remove(&shared.name);
    }
}
