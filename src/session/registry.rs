// Process-wide registry of running sessions, so that a roboflowresultsrc in
// the same or another pipeline can attach to a roboflowuploadsink's session by
// name, whichever of the two starts first.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::Duration;

use tokio::sync::Notify;

use super::Session;

static SESSIONS: LazyLock<Mutex<HashMap<String, Weak<Session>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));
static REGISTERED: LazyLock<Notify> = LazyLock::new(Notify::new);
/// Result sources that are starting, by session name: a sink whose session
/// one of them is about to read leaves the results to it.
static EXPECTED_SOURCES: LazyLock<Mutex<HashMap<String, usize>>> = LazyLock::new(|| Mutex::new(HashMap::new()));

pub fn expect_source(name: &str) {
    *EXPECTED_SOURCES.lock().unwrap().entry(name.to_owned()).or_default() += 1;
}

pub fn unexpect_source(name: &str) {
    let mut expected = EXPECTED_SOURCES.lock().unwrap();
    if let Some(count) = expected.get_mut(name) {
        *count = count.saturating_sub(1);
        if *count == 0 {
            expected.remove(name);
        }
    }
}

pub fn source_expected(name: &str) -> bool {
    EXPECTED_SOURCES.lock().unwrap().contains_key(name)
}

/// Registers `session` under its name; refuses a name a live session holds.
pub fn register(session: &Arc<Session>) -> Result<(), String> {
    let mut sessions = SESSIONS.lock().unwrap();
    sessions.retain(|_, weak| weak.strong_count() > 0);
    if sessions.contains_key(session.name()) {
        return Err(format!(
            "session name '{}' is already used by another running roboflowuploadsink; give each sink its own 'session'",
            session.name()
        ));
    }
    sessions.insert(session.name().to_owned(), Arc::downgrade(session));
    drop(sessions);
    REGISTERED.notify_waiters();
    Ok(())
}

/// Removes `session` (only that instance: a newer one of the same name stays).
pub fn unregister(session: &Arc<Session>) {
    let mut sessions = SESSIONS.lock().unwrap();
    if let Some(existing) = sessions.get(session.name())
        && existing.as_ptr() == Arc::as_ptr(session)
    {
        sessions.remove(session.name());
    }
}

pub fn lookup(name: &str) -> Option<Arc<Session>> {
    SESSIONS.lock().unwrap().get(name).and_then(Weak::upgrade)
}

/// Waits until a session called `name` is registered, up to `timeout`.
pub async fn wait_for(name: &str, timeout: Duration) -> Option<Arc<Session>> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let notified = REGISTERED.notified();
        if let Some(session) = lookup(name) {
            return Some(session);
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return lookup(name);
        }
    }
}
