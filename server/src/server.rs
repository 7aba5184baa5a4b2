//! [`run`]: the whole server on a listener until a shutdown future resolves.
//!
//! The shutdown signal is a plain future, as in mini-redis: `main` passes SIGINT/SIGTERM,
//! tests pass a oneshot. Draining goes:
//!
//! 1. health turns NOT_SERVING and the listener stops accepting;
//! 2. every `Chat` and `Subscribe` stream is told to reconnect and ends with UNAVAILABLE;
//! 3. connections close as their streams finish; after `shutdown_grace` whatever is left
//!    is dropped, so the process exits within a few seconds with clients still connected.

use std::{future::Future, sync::Arc, time::Duration};

use confab::pb::chat_service_server::ChatServiceServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::{
    codec::CompressionEncoding,
    service::interceptor::InterceptedService,
    transport::{Certificate, Identity, Server, ServerTlsConfig},
};

use crate::{
    auth::{AuthMode, Authenticator, JwtVerifier, Nicknames, Tokens},
    config::Config,
    connection::Incoming,
    engine::{Engine, EngineError, LocalEngine, RedisConfig, RedisEngine},
    hub::{Hub, HubConfig},
    limits::Limits,
    metrics::Metrics,
    rpc::ChatServer,
    stall::Watchdog,
    store::{MemoryStore, SqliteStore, Store, StoreError},
};

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The store could not be opened or loaded.
    #[error("storage: {0}")]
    Store(#[from] StoreError),
    /// The cluster's engine could not be reached or used.
    #[error("engine: {0}")]
    Engine(#[from] EngineError),
    /// The reflection service could not read the descriptors.
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// A setting is unusable.
    #[error("configuration: {0}")]
    Config(String),
    /// A limit setting is unusable.
    #[error("configuration: {0}")]
    Limits(#[from] crate::limits::LimitError),
    /// The transport failed.
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Every service accepts gzip and zstd requests, and compresses its responses with
/// whichever of them the client accepts (none unless it says so). The generated servers
/// share these methods but no trait, hence a macro.
macro_rules! compressed {
    ($service:expr) => {
        $service
            .accept_compressed(CompressionEncoding::Gzip)
            .accept_compressed(CompressionEncoding::Zstd)
            .send_compressed(CompressionEncoding::Zstd)
            .send_compressed(CompressionEncoding::Gzip)
    };
}

/// Reflection over every service this server offers, so that grpcurl and `buf curl` can
/// list and call them whichever reflection version they speak, and show the rich error
/// details (`google.rpc.BadRequest`, `RetryInfo`) in failed calls.
fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .include_reflection_service(false)
        .register_encoded_file_descriptor_set(confab::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
}

/// The TLS settings the flags ask for, if any.
fn tls_config(config: &Config) -> Result<Option<ServerTlsConfig>, ServerError> {
    let read = |path: &std::path::Path| {
        std::fs::read(path)
            .map_err(|e| ServerError::Config(format!("cannot read {}: {e}", path.display())))
    };
    let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) else {
        return Ok(None);
    };
    let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(read(cert)?, read(key)?));
    if let Some(ca) = &config.tls_client_ca {
        tls = tls.client_ca_root(Certificate::from_pem(read(ca)?));
    }
    Ok(Some(tls))
}

/// The identity-provider token verifier the flags ask for, if any.
fn jwt_verifier(config: &Config) -> Result<Option<JwtVerifier>, ServerError> {
    let verifier = match (&config.jwt_secret, &config.jwt_public_key) {
        (Some(secret), _) if secret.len() < 32 => {
            return Err(ServerError::Config(
                "--jwt-secret must be at least 32 characters".into(),
            ));
        }
        (Some(secret), _) => JwtVerifier::hs256(secret.as_bytes()),
        (None, Some(path)) => {
            let pem = std::fs::read(path)
                .map_err(|e| ServerError::Config(format!("cannot read {}: {e}", path.display())))?;
            JwtVerifier::public_key(&pem)
                .map_err(|e| ServerError::Config(format!("{}: {e}", path.display())))?
        }
        (None, None) => return Ok(None),
    };
    let verifier = match &config.jwt_issuer {
        Some(issuer) => verifier.issuer(issuer),
        None => verifier,
    };
    Ok(Some(match &config.jwt_audience {
        Some(audience) => verifier.audience(audience),
        None => verifier,
    }))
}

/// Serves Confab on `listener` until `shutdown` resolves, then drains and returns; serves
/// metrics on `--metrics-listen` if set.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    let metrics = bind_metrics(&config).await?;
    run_with_metrics(listener, metrics, config, shutdown).await
}

/// Binds `--metrics-listen`, if set, and logs where metrics are served. The binary calls
/// this before it logs its own "listening on" line, so that line means everything is up.
pub async fn bind_metrics(config: &Config) -> Result<Option<TcpListener>, ServerError> {
    let Some(addr) = config.metrics_listen else {
        return Ok(None);
    };
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| ServerError::Config(format!("cannot listen for metrics on {addr}: {e}")))?;
    let addr = listener.local_addr().unwrap_or(addr);
    tracing::info!(%addr, "metrics at http://{addr}/metrics");
    Ok(Some(listener))
}

/// [`run`], with the metrics endpoint on `metrics` (bound by the caller) if given.
pub async fn run_with_metrics(
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    config: Config,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    Ready::open(config)
        .await?
        .serve(listener, metrics_listener, shutdown)
        .await
}

/// A server whose storage is open and loaded and whose settings are checked: what is left
/// is to serve. The binary announces "listening on" only once it has one, so that the line
/// scripts wait for means the server can answer.
pub struct Ready {
    /// The settings.
    config: Config,
    /// Shared figures.
    metrics: Arc<Metrics>,
    /// Rate limits and counts.
    limits: Arc<Limits>,
    /// The engine (the hub holds it too; kept to close it after draining).
    engine: Arc<dyn Engine>,
    /// This node's rooms.
    hub: Arc<Hub>,
    /// How callers prove who they are.
    auth: Arc<AuthMode>,
    /// Who holds which nickname.
    nicknames: Arc<Nicknames>,
}

impl Ready {
    /// Checks the settings, opens (and migrates) the store and loads its rooms.
    pub async fn open(config: Config) -> Result<Self, ServerError> {
        let metrics = Arc::new(Metrics::new());
        let limits = Arc::new(Limits::new(config.limits.clone(), metrics.clone())?);
        let (engine, shared_secret) = open_engine(&config, &metrics).await?;
        let hub = Arc::new(Hub::new(
            engine.clone(),
            HubConfig {
                ring_capacity: config.ring_capacity,
                history_on_join: config.history_on_join,
            },
            limits.clone(),
            metrics.clone(),
        ));
        let nicknames = Arc::new(Nicknames::new(config.nickname_lease));
        let auth = Arc::new(match jwt_verifier(&config)? {
            Some(verifier) => {
                tracing::info!("authentication: tokens from an identity provider (JWT)");
                AuthMode::Jwt(Box::new(verifier))
            }
            None => AuthMode::Sessions {
                tokens: Arc::new(tokens(&config, shared_secret)?),
                nicknames: nicknames.clone(),
            },
        });
        Ok(Self {
            config,
            metrics,
            limits,
            engine,
            hub,
            auth,
            nicknames,
        })
    }

    /// Serves on `listener` (and metrics on `metrics_listener`) until `shutdown`
    /// resolves, drains every stream, and closes the store.
    pub async fn serve(
        self,
        listener: TcpListener,
        metrics_listener: Option<TcpListener>,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ServerError> {
        let drain = CancellationToken::new();
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<ChatServiceServer<ChatServer>>().await;
        let mut housekeeping = self.spawn_housekeeping(metrics_listener, &drain);
        let watchdog = Watchdog::new(self.config.stall_timeout);
        housekeeping.push(tokio::spawn(watchdog.clone().run()));
        housekeeping.push(tokio::spawn(follow_engine(
            self.engine.clone(),
            health.clone(),
            drain.clone(),
        )));
        let signal = drain_on(shutdown, drain.clone(), health);

        let local = listener.local_addr().ok();
        let mut builder = Server::builder();
        if let Some(tls) = tls_config(&self.config)? {
            builder = builder.tls_config(tls)?;
        }
        let incoming = Incoming::new(
            TcpListenerStream::new(listener),
            self.config.limits.max_connections_per_ip,
            self.metrics.clone(),
        );
        // Every call's span names the node, so that a cluster's merged logs tell them apart.
        let node: Arc<str> = self.engine.node_id().into();
        let serve = builder
            .trace_fn(move |request| {
                tracing::info_span!(
                    "call",
                    method = %request.uri().path(),
                    node = %node,
                    user = tracing::field::Empty,
                    room = tracing::field::Empty,
                )
            })
            .http2_keepalive_interval(Some(self.config.keepalive_interval))
            .http2_keepalive_timeout(Some(self.config.keepalive_timeout))
            .add_service(compressed!(health_service))
            .add_service(compressed!(reflection().build_v1()?))
            .add_service(compressed!(reflection().build_v1alpha()?))
            .add_service(self.chat_service(&drain, watchdog))
            .serve_with_incoming_shutdown(incoming, signal);

        let grace = self.config.shutdown_grace;
        let result = tokio::select! {
            result = serve => result.map_err(ServerError::from),
            () = async { drain.cancelled().await; tokio::time::sleep(grace).await } => {
                tracing::warn!(?grace, "connections still open after the grace period; closing them");
                Ok(())
            }
        };
        for task in housekeeping {
            task.abort();
        }
        // This node's users are gone: their nicknames are free on the other nodes now
        // rather than when the lease runs out.
        for (key, login) in self.nicknames.live_claims() {
            if let Err(error) = self.engine.release_nickname(&key, login).await {
                tracing::warn!(%error, "could not let this node's nicknames go");
                break;
            }
        }
        // Every acked message is committed already.
        self.engine.close().await;
        tracing::info!(addr = ?local, "server stopped");
        result
    }

    /// The chat service with its limits, compression and the interceptor that checks
    /// every call's credentials.
    fn chat_service(
        &self,
        drain: &CancellationToken,
        watchdog: Arc<Watchdog>,
    ) -> InterceptedService<ChatServiceServer<ChatServer>, Authenticator> {
        let chat = ChatServer::new(
            self.hub.clone(),
            self.auth.clone(),
            self.nicknames.clone(),
            drain.clone(),
            self.config.max_text_bytes,
            watchdog,
        );
        let chat = compressed!(ChatServiceServer::new(chat))
            .max_decoding_message_size(self.config.max_message_bytes)
            .max_encoding_message_size(self.config.max_message_bytes.max(1 << 20));
        InterceptedService::new(chat, Authenticator::new(self.auth.clone()))
    }

    /// The server's own tasks: forgetting lapsed nickname claims and full rate buckets (so
    /// neither registry grows with every user ever seen), the metrics endpoint, and
    /// retention. Aborted once the server has drained.
    fn spawn_housekeeping(
        &self,
        metrics_listener: Option<TcpListener>,
        drain: &CancellationToken,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let mut tasks = Vec::new();
        let nicknames = self.nicknames.clone();
        let limits = self.limits.clone();
        let period = self.config.nickname_lease.max(Duration::from_secs(1));
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                nicknames.prune();
                limits.prune();
            }
        }));
        // Live claims stay held over the cluster (a no-op on one node): renewed well
        // within their lease.
        let (nicknames, engine) = (self.nicknames.clone(), self.engine.clone());
        let renew = (self.config.nickname_lease / 3).max(Duration::from_secs(1));
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(renew);
            loop {
                tick.tick().await;
                for (key, login) in nicknames.live_claims() {
                    match engine.hold_nickname(&key, login, nicknames.lease()).await {
                        Ok(true) => {}
                        Ok(false) => tracing::warn!(key, "a live nickname is held elsewhere"),
                        Err(error) => {
                            tracing::warn!(%error, "cannot renew nickname claims");
                            break;
                        }
                    }
                }
            }
        }));
        if let Some(listener) = metrics_listener {
            let drained = drain.clone();
            let served = crate::metrics::serve(
                listener,
                self.metrics.clone(),
                self.hub.clone(),
                async move { drained.cancelled().await },
            );
            tasks.push(tokio::spawn(async move {
                if let Err(error) = served.await {
                    tracing::error!(%error, "the metrics endpoint failed");
                }
            }));
        }
        let retention = self.config.retention();
        if retention.is_enabled() {
            let engine = self.engine.clone();
            let period = self.config.retention_interval;
            tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(period);
                loop {
                    tick.tick().await;
                    if let Err(error) = engine.apply_retention(retention).await {
                        tracing::error!(%error, "retention failed");
                    }
                }
            }));
        }
        tasks
    }
}

/// The engine the flags ask for: a cluster node on Redis, or local, on SQLite in the data
/// dir (created, migrated) or in memory. With Redis, also the nodes' shared token secret.
async fn open_engine(
    config: &Config,
    metrics: &Arc<Metrics>,
) -> Result<(Arc<dyn Engine>, Option<String>), ServerError> {
    if !config.redis.is_empty() {
        let node_id = config.node_id.clone().unwrap_or_else(|| {
            use rand::Rng as _;
            format!("node-{:08x}", rand::rng().random::<u32>())
        });
        let engine = RedisEngine::connect(
            RedisConfig {
                urls: config.redis.clone(),
                node_id,
                dedupe_window: config.dedupe_window,
                retention: config.retention(),
            },
            metrics.clone(),
        )
        .await?;
        let secret = match config.token_secret {
            Some(_) => None,
            None => Some(engine.token_secret().await?),
        };
        return Ok((Arc::new(engine), secret));
    }
    let store: Arc<dyn Store> = if config.in_memory {
        tracing::info!("storage: in memory (nothing will survive this process)");
        Arc::new(MemoryStore::new())
    } else {
        tracing::info!(data_dir = %config.data_dir.display(), "storage: SQLite");
        Arc::new(SqliteStore::open(&config.data_dir)?)
    };
    let engine = LocalEngine::open(store, config.dedupe_window, metrics.clone())?;
    Ok((Arc::new(engine), None))
}

/// The key that signs session tokens: `--token-secret`, else the cluster's `shared` one,
/// else the data dir's (made on first start), else (in memory) one for this process only.
fn tokens(config: &Config, shared: Option<String>) -> Result<Tokens, ServerError> {
    if let Some(shared) = shared {
        return Ok(Tokens::new(shared.as_bytes(), config.token_ttl));
    }
    Ok(match (&config.token_secret, config.in_memory) {
        (Some(secret), _) if secret.len() < 32 => {
            return Err(ServerError::Config(
                "--token-secret must be at least 32 characters".into(),
            ));
        }
        (Some(secret), _) => Tokens::new(secret.as_bytes(), config.token_ttl),
        (None, true) => Tokens::ephemeral(config.token_ttl),
        (None, false) => {
            Tokens::persistent(&config.data_dir.join("token-secret"), config.token_ttl)
                .map_err(|e| ServerError::Config(format!("token secret: {e}")))?
        }
    })
}

/// Keeps health in step with the engine: NOT_SERVING while it cannot be reached (open
/// streams stay; sends fail with UNAVAILABLE), SERVING when it is back, until the drain.
async fn follow_engine(
    engine: Arc<dyn Engine>,
    health: tonic_health::server::HealthReporter,
    drain: CancellationToken,
) {
    let mut serving = true;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            () = drain.cancelled() => return,
            _ = tick.tick() => {}
        }
        let available = engine.is_available();
        if available == serving {
            continue;
        }
        serving = available;
        if drain.is_cancelled() {
            return;
        }
        let status = if serving {
            tracing::info!("the engine is back: serving");
            health.set_serving::<ChatServiceServer<ChatServer>>().await;
            tonic_health::ServingStatus::Serving
        } else {
            tracing::warn!("the engine is out of reach: not serving");
            health
                .set_not_serving::<ChatServiceServer<ChatServer>>()
                .await;
            tonic_health::ServingStatus::NotServing
        };
        health.set_service_status("", status).await;
    }
}

/// Waits for `shutdown`, then turns health NOT_SERVING and tells every stream to drain.
async fn drain_on(
    shutdown: impl Future<Output = ()>,
    drain: CancellationToken,
    health: tonic_health::server::HealthReporter,
) {
    shutdown.await;
    tracing::info!("shutting down: draining streams");
    health
        .set_not_serving::<ChatServiceServer<ChatServer>>()
        .await;
    health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    drain.cancel();
}
