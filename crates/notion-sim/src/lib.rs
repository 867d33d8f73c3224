//! notion-sim: a faithful, stateful simulator of Notion's OAuth endpoints and a slice of its REST
//! API, for tests, benchmarks and users who want to see how their integration copes with
//! Notion's token rotation (notion-wire.md describes what it imitates).
//!
//! Start it in a test with [`SimServer::start`] (port 0), or serve it on a listener of your own
//! with [`serve`]; `tokenkeeper notion-sim` runs it from the command line ([`run_cli`]).
//! Behaviour is set by [`SimConfig`], changeable at run time with [`SimServer::update_config`]
//! or `POST /_sim/config`.
//! Tests control time with a manual [`SimClock`] ([`SimServer::start_with_clock`]) and decide
//! when an answer leaves with a [`Hold`] ([`SimServer::hold`]).
//!
//! Code map:
//! - `config`: the settings; `cli`: the same settings as flags.
//! - `world`: workspaces, users, bots, pages, codes and tokens, and the rules that move them.
//! - `server`: accepting connections, routing, faults, latency, logging, response helpers.
//! - `oauth`, `rest`, `control`: the handlers of `/v1/oauth/*`, the REST slice and `/_sim/*`.
//! - `faults`, `limits`, `observe`: fault rules, rate-limit windows, stats and the request log.
//! - `clock`, `hold`: the simulator's time, and answers held until a test releases them.

// Handlers return `Result<_, Response<Body>>` so that a refusal is an early return of the very
// answer to send. The response is moved out once per request; boxing it to satisfy this lint
// would add an allocation and noise at every `?` without making anything clearer.
#![allow(clippy::result_large_err)]

mod cli;
mod clock;
mod config;
mod control;
mod endpoint;
mod exchange;
mod faults;
mod hold;
mod limits;
mod oauth;
mod observe;
mod rest;
mod server;
mod token;
mod world;

use std::net::SocketAddr;
use std::sync::Arc;

pub use cli::{run_cli, SimArgs};
pub use clock::SimClock;
pub use config::{
    parse_duration, OwnerKind, PreviousPairPolicy, ReauthMode, RefreshReusePolicy, SimConfig,
    ALL_CAPABILITIES,
};
pub use hold::{Hold, HOLD_DEADLINE};
pub use token::fingerprint;

use exchange::Shared;

/// A running simulator on `127.0.0.1` and a free port.
pub struct SimServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl SimServer {
    /// Binds `127.0.0.1:0` and serves until [`SimServer::shutdown`], on the system clock.
    pub async fn start(config: SimConfig) -> anyhow::Result<SimServer> {
        SimServer::start_with_clock(config, SimClock::system()).await
    }

    /// Like [`SimServer::start`], with every expiry, window and timestamp read from `clock`;
    /// with [`SimClock::manual`], time stands still until the test advances it.
    pub async fn start_with_clock(config: SimConfig, clock: SimClock) -> anyhow::Result<SimServer> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::new(config, clock));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server::run(listener, shared.clone(), async move {
            let _ = stopped.await;
        }));
        Ok(SimServer {
            addr,
            shared,
            stop,
            task,
        })
    }

    /// `http://127.0.0.1:PORT`, the value for a Notion client's base URL.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The settings in force.
    pub fn config(&self) -> SimConfig {
        SimConfig::clone(&self.shared.config())
    }

    /// Changes settings at run time; requests that already started keep the old ones.
    pub fn update_config(&self, f: impl FnOnce(&mut SimConfig)) {
        self.shared.update_config(f);
    }

    /// The simulator's clock (a clone shares it): `sim.clock().advance(ttl)` expires tokens.
    pub fn clock(&self) -> SimClock {
        self.shared.clock.clone()
    }

    /// Holds the answers of requests to `endpoint` (`users.me`, `oauth.token`, or one grant:
    /// `oauth.token:refresh_token`) after they were processed, until the test releases them;
    /// see [`Hold`].
    ///
    /// # Panics
    ///
    /// On an unknown endpoint name or grant type, which would otherwise hold nothing and leave
    /// the test waiting for [`Hold::arrived`].
    pub fn hold(&self, endpoint: &str) -> Hold {
        match self.shared.holds.add(endpoint) {
            Ok(state) => Hold::new(state),
            Err(error) => panic!("SimServer::hold({endpoint:?}): {error}"),
        }
    }

    /// Stops accepting connections and waits (briefly) for open ones to finish.
    pub async fn shutdown(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// Serves the simulator on `listener` until `shutdown` completes (the shape of mini-redis's
/// `server::run`).
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: SimConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    serve_with_clock(listener, config, SimClock::system(), shutdown).await
}

/// [`serve`] with every expiry, window and timestamp read from `clock`.
pub async fn serve_with_clock(
    listener: tokio::net::TcpListener,
    config: SimConfig,
    clock: SimClock,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    server::run(listener, Arc::new(Shared::new(config, clock)), shutdown).await
}
