//! Accepting connections: HTTP/1 and HTTP/2 on a TCP listener, each
//! request told its client's address. Every connection has a deadline: its
//! first request's headers within the header timeout (HTTP/1 and HTTP/2
//! alike, counted from the accept), and each next request within the idle
//! timeout of the last response. At most so many connections are open
//! (`connections.rs`): at the cap the connection idle longest makes room,
//! and only when all are busy is a new one closed at once. Accept errors
//! (out of file descriptors) are backed off from, and idle connections
//! closed to free descriptors. A graceful stop lets open requests finish.

mod connections;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};

use crate::metrics::Metrics;
use connections::{Conn, InFlight, Reason, Table, Timeouts, Wait};

/// How long a connection told to close while idle may take to go (to send
/// HTTP/2's GOAWAY; a client that never answers its ping is not waited for).
const CLOSE_GRACE: Duration = Duration::from_millis(200);
/// The most connections open by default, whatever the descriptor limit.
const DEFAULT_MAX_CONNECTIONS: u64 = 16_384;
/// Bytes of a response a connection holds beyond what the socket took:
/// two blob chunks (storage streams 64 KiB at a time), so that 200
/// downloads at once hold about 25 MiB. (hyper's default, about 400 KiB,
/// held six chunks each.) It also bounds an HTTP/1 request's headers: up
/// to it, headers over the router's 16 KiB get its JSON 431; beyond it,
/// hyper's bare one.
const SEND_BUFFER: usize = 128 * 1024;
/// Idle connections closed at once when descriptors run out.
const EVICT_ON_EXHAUSTION: usize = 16;
/// How often accept errors are logged at most.
const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(1);

/// What answers the requests of a connection, told whose they are.
pub trait App: Clone + Send + Sync + 'static {
    fn answer(&self, request: Request<Body>, peer: SocketAddr) -> impl Future<Output = Response<Body>> + Send;
}

/// Bounds on connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// From the accept to the first request's headers.
    pub header_timeout: Duration,
    /// From a response to the next request's headers.
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

/// Raises the soft limit on open files to the hard limit; the limit now.
pub fn raise_fd_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the limit into the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return 1024;
    }
    let target = limit.rlim_max.min(1 << 20);
    if limit.rlim_cur < target {
        let raised = libc::rlimit {
            rlim_cur: target,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit reads the struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
    }
    limit.rlim_cur
}

/// Three quarters of the descriptor limit (the rest for storage files, Nix
/// and its pipes), at most [`DEFAULT_MAX_CONNECTIONS`].
pub fn default_max_connections(fd_limit: u64) -> usize {
    (fd_limit / 4 * 3).clamp(16, DEFAULT_MAX_CONNECTIONS) as usize
}

/// Serves `app` until `stop` completes; then accepts no more connections and
/// returns once the open ones have finished (callers bound that wait).
pub async fn serve(
    listener: TcpListener,
    app: impl App,
    stop: impl Future<Output = ()>,
    limits: Limits,
    metrics: Arc<Metrics>,
) {
    let timeouts = Timeouts {
        first_request: limits.header_timeout,
        idle: limits.idle_timeout,
    };
    let table = Table::new(limits.max_connections, timeouts);
    let mut backoff = Backoff::default();
    let mut stop = std::pin::pin!(stop);
    loop {
        tokio::select! {
            accepted = async {
                table.room().await;
                listener.accept().await
            } => match accepted {
                Ok((stream, peer)) => {
                    backoff.reset();
                    accept(&table, stream, peer, &app, &metrics);
                }
                Err(error) => {
                    if is_out_of_descriptors(&error) {
                        metrics.connections_closed(Reason::Evicted.name(), table.evict_idle(EVICT_ON_EXHAUSTION));
                    }
                    backoff.failed(&error).await;
                }
            },
            () = &mut stop => break,
        }
    }
    drop(listener);
    table.stop();
    table.all_closed().await;
}

/// Serves a new connection, or closes it at once when every place is busy.
fn accept(table: &Arc<Table>, stream: TcpStream, peer: SocketAddr, app: &impl App, metrics: &Arc<Metrics>) {
    match table.admit() {
        Ok((conn, evicted)) => {
            metrics.connections_closed(Reason::Evicted.name(), usize::from(evicted));
            metrics.connections_open(table.open());
            let (app, metrics, table) = (app.clone(), Arc::clone(metrics), Arc::clone(table));
            tokio::spawn(async move {
                if let Some(reason) = drive(stream, peer, app, conn).await {
                    metrics.connections_closed(reason.name(), 1);
                }
                metrics.connections_open(table.open());
            });
        }
        Err(connections::Full) => {
            metrics.connections_closed("refused", 1);
            tracing::debug!(%peer, "every connection is busy: refused one");
        }
    }
}

/// Serves one connection until it ends or is told to close; why we closed
/// it, when we did.
async fn drive(stream: TcpStream, peer: SocketAddr, app: impl App, conn: Arc<Conn>) -> Option<Reason> {
    let service = {
        let conn = Arc::clone(&conn);
        hyper::service::service_fn(move |request| handle(request, peer, app.clone(), conn.request_started()))
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().max_buf_size(SEND_BUFFER);
    builder.http2().max_send_buf_size(SEND_BUFFER);
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    let mut connection = std::pin::pin!(connection);
    let reason = loop {
        let deadline = match conn.wait() {
            Wait::Close(reason) => break reason,
            Wait::Until(at, _) | Wait::Busy(at) => at,
        };
        tokio::select! {
            ended = connection.as_mut() => {
                log_end(peer, ended);
                return None;
            }
            () = conn.changed() => {}
            () = tokio::time::sleep_until(deadline.into()) => {}
        }
    };
    connection.as_mut().graceful_shutdown();
    // Requests in flight finish (a stop's grace is bounded by its caller);
    // an idle connection gets a moment to go, then is dropped.
    loop {
        let idle = reason != Reason::Stopping && !conn.busy();
        tokio::select! {
            ended = connection.as_mut() => {
                log_end(peer, ended);
                break;
            }
            () = conn.changed() => {}
            () = tokio::time::sleep(CLOSE_GRACE), if idle => break,
        }
    }
    Some(reason)
}

/// One request: the app's answer, with the connection counted busy until
/// the answer's body has been sent (or dropped).
async fn handle(
    request: hyper::Request<Incoming>,
    peer: SocketAddr,
    app: impl App,
    in_flight: InFlight,
) -> Result<hyper::Response<Body>, Infallible> {
    let response = app.answer(request.map(Body::new), peer).await;
    Ok(response.map(|body| {
        Body::new(Guarded {
            body,
            _in_flight: in_flight,
        })
    }))
}

/// A response body that holds its request's place until it is done.
struct Guarded {
    body: Body,
    _in_flight: InFlight,
}

impl http_body::Body for Guarded {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

fn log_end(peer: SocketAddr, ended: Result<(), Box<dyn std::error::Error + Send + Sync>>) {
    if let Err(error) = ended {
        tracing::debug!(%peer, %error, "connection ended with an error");
    }
}

fn is_out_of_descriptors(error: &std::io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// Waits after accept errors: 5 ms, doubling up to a second, and logs
/// them at most once a second.
#[derive(Debug, Default)]
struct Backoff {
    delay: Duration,
    unlogged: usize,
    logged: Option<Instant>,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(5);
    const MOST: Duration = Duration::from_secs(1);

    fn reset(&mut self) {
        self.delay = Duration::ZERO;
    }

    async fn failed(&mut self, error: &std::io::Error) {
        self.unlogged += 1;
        if self.logged.is_none_or(|at| at.elapsed() >= ERROR_LOG_INTERVAL) {
            tracing::warn!(%error, errors = self.unlogged, "cannot accept connections; backing off");
            self.logged = Some(Instant::now());
            self.unlogged = 0;
        }
        self.delay = (self.delay * 2).clamp(Self::FIRST, Self::MOST);
        tokio::time::sleep(self.delay).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_cap_leaves_descriptors_for_other_work() {
        assert_eq!(default_max_connections(256), 192);
        assert_eq!(default_max_connections(1024), 768);
        assert_eq!(default_max_connections(1 << 20), 16_384);
        assert_eq!(default_max_connections(8), 16);
    }

    #[test]
    fn the_limit_is_raised_to_the_hard_limit() {
        let limit = raise_fd_limit();
        let mut now = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: as in raise_fd_limit.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut now) }, 0);
        assert_eq!(limit, now.rlim_cur);
        assert!(now.rlim_cur == now.rlim_max || now.rlim_cur == 1 << 20);
    }

    #[tokio::test]
    async fn backoff_doubles_to_a_second() {
        let mut backoff = Backoff::default();
        let error = std::io::Error::from_raw_os_error(libc::EMFILE);
        for _ in 0..3 {
            backoff.failed(&error).await;
        }
        assert_eq!(backoff.delay, Duration::from_millis(20));
        backoff.reset();
        assert_eq!(backoff.delay, Duration::ZERO);
    }
}
