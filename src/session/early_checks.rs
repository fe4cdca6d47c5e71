// ICE connectivity checks that arrive before the server's answer.
//
// The server (aioice) sends its first connectivity check (a STUN Binding
// request) as soon as it has our offer, so the check usually arrives before
// the HTTP answer does. webrtc-rs 0.21.1 drops a check that arrives before
// the remote description is applied, and aioice sends it again only after
// its 500 ms retransmission timeout: every session connected 0.5 s late
// (measured on loopback: 506 ms from applying the answer to "connected",
// every time), and a camera the server reads filled the server's queue
// meanwhile, which then dropped about 7 frames (PROTOCOL.md §11).
//
// The session's UDP socket therefore keeps a copy of each Binding request
// that arrives before the answer is applied, and hands those copies to
// webrtc-rs again once it is; webrtc-rs then answers them (RFC 8445 §7.3
// expects an agent to answer such early checks).

use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use webrtc::runtime::{
    AsyncInterval, AsyncTcpListener, AsyncTcpStream, AsyncUdpSocket, JoinHandle, RecvMeta, Runtime, TokioRuntime,
    Transmit,
};

/// At most this many early checks are kept (the server sends one per
/// candidate pair, and resends each every 500 ms or so).
const MAX_HELD: usize = 16;

/// Whether a datagram is a STUN Binding request (RFC 8489: type 0x0001,
/// the magic cookie at bytes 4-7).
pub fn is_binding_request(datagram: &[u8]) -> bool {
    datagram.len() >= 20 && datagram[..2] == [0x00, 0x01] && datagram[4..8] == [0x21, 0x12, 0xa4, 0x42]
}

/// The early checks of one session, shared by its socket and its driver.
#[derive(Debug, Default)]
pub struct EarlyChecks {
    state: Mutex<HeldChecks>,
    /// The answer is applied and every held check handed over: from then
    /// on the socket reads as if it were not wrapped (no lock per datagram).
    settled: AtomicBool,
}

#[derive(Debug, Default)]
struct HeldChecks {
    answer_applied: bool,
    held: VecDeque<(Vec<u8>, RecvMeta)>,
    /// The socket's reader, woken when the held checks can be handed over.
    reader: Option<Waker>,
}

impl EarlyChecks {
    /// The remote description is applied: the checks held are handed to
    /// webrtc-rs again, and no more are kept.
    pub fn answer_applied(&self) {
        let mut state = self.state.lock().unwrap();
        state.answer_applied = true;
        if state.held.is_empty() {
            self.settled.store(true, Ordering::Release);
        } else if let Some(reader) = state.reader.take() {
            reader.wake();
        }
    }

    fn settled(&self) -> bool {
        self.settled.load(Ordering::Acquire)
    }

    /// Keeps the Binding requests among `received` (the datagrams of one
    /// receive, `stride` bytes apart when the kernel coalesced them).
    fn keep(&self, received: &[u8], meta: &RecvMeta) {
        let mut state = self.state.lock().unwrap();
        if state.answer_applied {
            return;
        }
        let stride = if meta.stride == 0 { received.len() } else { meta.stride };
        for datagram in received.chunks(stride.max(1)) {
            if is_binding_request(datagram) && state.held.len() < MAX_HELD {
                let mut copy = *meta;
                (copy.len, copy.stride) = (datagram.len(), datagram.len());
                state.held.push_back((datagram.to_vec(), copy));
            }
        }
    }

    /// A held check to hand over now, into `buf`.
    fn take(&self, buf: &mut [u8]) -> Option<RecvMeta> {
        let mut state = self.state.lock().unwrap();
        if !state.answer_applied {
            return None;
        }
        let (datagram, mut meta) = state.held.pop_front()?;
        if state.held.is_empty() {
            self.settled.store(true, Ordering::Release);
        }
        let len = datagram.len().min(buf.len());
        buf[..len].copy_from_slice(&datagram[..len]);
        (meta.len, meta.stride) = (len, len);
        Some(meta)
    }

    fn waiting_reader(&self, waker: &Waker) {
        let mut state = self.state.lock().unwrap();
        if !state.answer_applied {
            state.reader = Some(waker.clone());
        }
    }
}

/// webrtc-rs's tokio runtime, with sockets that keep early checks.
#[derive(Debug)]
pub struct EarlyCheckRuntime {
    inner: TokioRuntime,
    checks: Arc<EarlyChecks>,
}

impl EarlyCheckRuntime {
    pub fn new(checks: Arc<EarlyChecks>) -> EarlyCheckRuntime {
        EarlyCheckRuntime { inner: TokioRuntime, checks }
    }
}

impl Runtime for EarlyCheckRuntime {
    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) -> Box<dyn JoinHandle> {
        self.inner.spawn(future)
    }

    fn spawn_reactor(&self, reactor_pool_size: usize, future: Pin<Box<dyn Future<Output = ()> + Send>>) -> Box<dyn JoinHandle> {
        self.inner.spawn_reactor(reactor_pool_size, future)
    }

    fn wrap_udp_socket(&self, socket: std::net::UdpSocket) -> io::Result<Arc<dyn AsyncUdpSocket>> {
        let inner = self.inner.wrap_udp_socket(socket)?;
        Ok(Arc::new(EarlyCheckSocket { inner, checks: self.checks.clone() }))
    }

    fn wrap_tcp_listener(&self, listener: std::net::TcpListener) -> io::Result<Arc<dyn AsyncTcpListener>> {
        self.inner.wrap_tcp_listener(listener)
    }

    fn connect_tcp<'a>(
        &'a self,
        remote_addr: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = io::Result<Arc<dyn AsyncTcpStream>>> + Send + 'a>> {
        self.inner.connect_tcp(remote_addr)
    }

    fn resolve_host<'a>(&'a self, host: &'a str) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'a>> {
        self.inner.resolve_host(host)
    }

    fn now(&self) -> Instant {
        self.inner.now()
    }

    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
        self.inner.sleep(duration)
    }

    fn interval(&self, period: Duration) -> Box<dyn AsyncInterval> {
        self.inner.interval(period)
    }

    fn block_on(&self, future: Pin<Box<dyn Future<Output = ()> + '_>>) {
        self.inner.block_on(future)
    }

    fn yield_now(&self) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
        self.inner.yield_now()
    }
}

#[derive(Debug)]
struct EarlyCheckSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    checks: Arc<EarlyChecks>,
}

impl AsyncUdpSocket for EarlyCheckSocket {
    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn poll_send(&self, cx: &mut Context<'_>, transmit: &Transmit<'_>) -> Poll<io::Result<usize>> {
        self.inner.poll_send(cx, transmit)
    }

    fn max_gso_segments(&self) -> usize {
        self.inner.max_gso_segments()
    }

    fn max_gro_segments(&self) -> usize {
        self.inner.max_gro_segments()
    }

    fn poll_recv(&self, cx: &mut Context<'_>, bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta]) -> Poll<io::Result<usize>> {
        if self.checks.settled() {
            return self.inner.poll_recv(cx, bufs, meta);
        }
        if let (Some(buf), Some(slot)) = (bufs.first_mut(), meta.first_mut())
            && let Some(held) = self.checks.take(buf)
        {
            *slot = held;
            return Poll::Ready(Ok(1));
        }
        let poll = self.inner.poll_recv(cx, bufs, meta);
        if let Poll::Ready(Ok(received)) = &poll {
            for (buf, meta) in bufs.iter().zip(meta.iter()).take(*received) {
                self.checks.keep(&buf[..meta.len.min(buf.len())], meta);
            }
        }
        self.checks.waiting_reader(cx.waker());
        poll
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REQUEST: [u8; 20] = [0, 1, 0, 0, 0x21, 0x12, 0xa4, 0x42, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];

    fn meta(len: usize, stride: usize) -> RecvMeta {
        let mut meta = RecvMeta::default();
        (meta.addr, meta.len, meta.stride) = ("127.0.0.1:5000".parse().unwrap(), len, stride);
        meta
    }

    #[test]
    fn binding_requests_are_told_from_other_datagrams() {
        assert!(is_binding_request(&REQUEST));
        let mut response = REQUEST;
        response[0] = 1; // 0x0101: a Binding success response
        assert!(!is_binding_request(&response));
        let mut no_cookie = REQUEST;
        no_cookie[4] = 0;
        assert!(!is_binding_request(&no_cookie));
        assert!(!is_binding_request(&REQUEST[..19]));
        assert!(!is_binding_request(&[0x16, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]), "DTLS");
    }

    #[test]
    fn checks_before_the_answer_are_handed_over_after_it() {
        let checks = EarlyChecks::default();
        assert!(!checks.settled());
        let mut other = REQUEST;
        other[0] = 0x80; // RTP-like: not kept
        let mut received = REQUEST.to_vec();
        received.extend_from_slice(&other);
        // Two coalesced datagrams of 20 bytes: only the request is kept.
        checks.keep(&received, &meta(40, 20));
        let mut buf = [0u8; 64];
        assert!(checks.take(&mut buf).is_none(), "nothing before the answer");
        checks.answer_applied();
        let handed = checks.take(&mut buf).expect("the early check");
        assert_eq!((handed.len, handed.stride), (20, 20));
        assert_eq!(&buf[..20], &REQUEST);
        assert!(checks.take(&mut buf).is_none(), "only once");
        assert!(checks.settled(), "nothing held any more: the socket reads straight through");
        // After the answer, nothing more is kept.
        checks.keep(&REQUEST, &meta(20, 20));
        assert!(checks.take(&mut buf).is_none());
    }

    #[test]
    fn the_reader_is_woken_when_the_answer_is_applied() {
        use std::task::Wake;
        struct Flag(AtomicBool);
        impl Wake for Flag {
            fn wake(self: Arc<Self>) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let flag = Arc::new(Flag(AtomicBool::new(false)));
        let checks = EarlyChecks::default();
        checks.keep(&REQUEST, &meta(20, 0));
        checks.waiting_reader(&Waker::from(flag.clone()));
        assert!(!flag.0.load(Ordering::SeqCst));
        checks.answer_applied();
        assert!(flag.0.load(Ordering::SeqCst), "woken to take the held check");
    }

    #[test]
    fn at_most_max_held_checks_are_kept() {
        let checks = EarlyChecks::default();
        for _ in 0..MAX_HELD + 5 {
            checks.keep(&REQUEST, &meta(20, 20));
        }
        checks.answer_applied();
        let mut buf = [0u8; 64];
        let mut handed = 0;
        while checks.take(&mut buf).is_some() {
            handed += 1;
        }
        assert_eq!(handed, MAX_HELD);
    }
}
