//! The `nixery` command: reads the configuration, wires the modules
//! together and serves the registry until SIGINT or SIGTERM, then lets open
//! requests and builds finish; or builds one image, or collects garbage.

use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use nixery::activity::Activity;
use nixery::app::{AppState, Signing};
use nixery::builder::{Builder, Parts, Settings, Want};
use nixery::config::{Cli, Command, LayersArgs, LogFormat, ServeConfig};
use nixery::export::{self, OutputFormat};
use nixery::gc::{self, Outcome};
use nixery::image::ImageRequest;
use nixery::layers::{self, Popularity, RuntimeGraph};
use nixery::learning::Learned;
use nixery::leases::Leases;
use nixery::listen;
use nixery::metrics::Metrics;
use nixery::negotiate::Choice;
use nixery::nix::Nix;
use nixery::oci::Format;
use nixery::programs::Programs;
use nixery::pulls::Pulls;
use nixery::redact;
use nixery::server;
use nixery::source::LATEST;
use nixery::storage::Storage;
use nixery::web;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run(Cli::parse().command).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("Error: {}", redact::scrub(&format!("{error:#}")));
            std::process::ExitCode::FAILURE
        }
    }
}

/// Signatures (and their payloads) kept for the GETs that follow them.
const SIGNATURES_KEPT: u64 = 10_000;
/// Names and documents their tags resolved to, kept for signing at most.
const RESOLVED_KEPT: u64 = 100_000;

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve(args) => {
            let format = args.log_format;
            let config = args.check()?;
            init_logging(format, "info", &config);
            serve(config).await
        }
        Command::Build(args) => {
            let format = args.registry.log_format;
            let (config, image, output, output_format) = args.check()?;
            init_logging(format, "warn", &config);
            build(config, &image, &output, output_format).await
        }
        Command::Gc(args) => {
            let format = args.registry.log_format;
            let (config, options) = args.check()?;
            init_logging(format, "warn", &config);
            collect_once(config, &options).await
        }
        Command::Layers(args) => print_layers(args),
    }
}

/// `nixery gc`: one collection, each step's figures on stdout, and last a
/// machine-readable line.
async fn collect_once(config: ServeConfig, options: &gc::Options) -> anyhow::Result<()> {
    let storage = Storage::open(&config.storage)
        .await
        .with_context(|| format!("cannot use the {} storage backend", config.storage.backend.name()))?;
    let leases = Leases::new(storage.clone());
    let say = |line: &str| println!("{line}");
    match gc::collect(&storage, &leases, options, &say).await? {
        Outcome::Done(report) => println!("{}", report.line()),
        Outcome::Busy { holder } => println!("gc busy: another collection holds the lease ({holder})"),
    }
    Ok(())
}

/// `nixery layers`: a graph file's layer plan as JSON on stdout.
fn print_layers(args: LayersArgs) -> anyhow::Result<()> {
    let read = |path: &std::path::Path| std::fs::read(path).with_context(|| format!("cannot read {}", path.display()));
    let graph = RuntimeGraph::from_graph_file(&read(&args.graph)?)
        .with_context(|| format!("{} is not a runtime graph", args.graph.display()))?;
    let popularity = match &args.popularity {
        Some(path) => Popularity::from_json(&read(path)?)?,
        None => Popularity::default(),
    };
    let base = graph.roots_named(&args.base);
    let inputs = layers::Inputs {
        popularity: &popularity,
        budget: args.budget,
        base: &base,
    };
    let sizes: std::collections::HashMap<&str, u64> =
        graph.paths.iter().map(|p| (p.path.as_str(), p.nar_size)).collect();
    let plan: Vec<serde_json::Value> = layers::plan(args.strategy, &graph, inputs)
        .into_iter()
        .map(|layer| {
            let size: u64 = layer.paths.iter().map(|p| sizes[p.as_str()]).sum();
            serde_json::json!({ "paths": layer.paths, "size": size })
        })
        .collect();
    println!("{}", serde_json::json!({ "layers": plan }));
    Ok(())
}

/// Logs to stderr at `RUST_LOG`'s level, else at `level`, never showing
/// the configuration's secrets; then warns of a signing key open to others.
fn init_logging(format: LogFormat, level: &str, config: &ServeConfig) {
    redact::install(config.secrets.clone());
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(redact::ScrubbedStderr);
    match format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    if let Some(signer) = &config.signer {
        signer.warn_if_exposed();
    }
}

async fn serve(config: ServeConfig) -> anyhow::Result<()> {
    let fd_limit = listen::raise_fd_limit();
    let limits = listen::Limits {
        header_timeout: config.header_timeout,
        idle_timeout: config.idle_timeout,
        max_connections: config
            .max_connections
            .unwrap_or_else(|| listen::default_max_connections(fd_limit)),
    };
    let (address, grace) = (config.listen, config.shutdown_timeout);
    let pull_record_interval = config.pull_record_interval;
    let retention = config.gc_interval.map(|interval| (interval, config.retention.clone()));
    let (proxies, pages) = (config.trusted_proxies.clone(), config.web);
    let state = open(config).await?;
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot listen on {address}"))?;
    let address = listener.local_addr()?;
    tracing::info!(%address, max_connections = limits.max_connections, fd_limit, "nixery is serving");
    eprintln!(
        "nixery is serving on http://{address}\n  pull an image: skopeo copy --src-tls-verify=false docker://{address}/shell/hello oci:hello:latest\n  or:            docker pull {address}/shell/hello"
    );
    let app = server::router(state.clone(), proxies, web::routes(pages));
    let recorder = tokio::spawn(record_pulls(Arc::clone(state.builder.pulls()), pull_record_interval));
    let upkeep = tokio::spawn(upkeep(state.clone(), pull_record_interval, retention));
    let served = serve_until_stopped(listener, app, &state, grace, limits).await;
    recorder.abort();
    upkeep.abort();
    flush_pulls(state.builder.pulls()).await;
    served
}

/// Writes the images pulled since the last time, once per `interval`.
async fn record_pulls(pulls: Arc<Pulls>, interval: std::time::Duration) {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    loop {
        ticks.tick().await;
        flush_pulls(&pulls).await;
    }
}

async fn flush_pulls(pulls: &Pulls) {
    match pulls.flush().await {
        Ok(written) => tracing::debug!(written, "recorded the images pulled"),
        Err(error) => tracing::warn!(%error, "could not record the images pulled; trying again later"),
    }
}

/// Measures storage at start and every `measure_every`; with a GC
/// interval, collects garbage that often too (when no other replica does),
/// a full interval after the end of the last one, so that builds waiting
/// for a sweep to end get their turn. Notices collections by other
/// processes within [`gc::NOTICE_EVERY`], and forgets what memory holds of
/// storage after each.
async fn upkeep(
    state: AppState,
    measure_every: std::time::Duration,
    collection: Option<(std::time::Duration, gc::Options)>,
) {
    let measures = async {
        loop {
            measure(&state).await;
            tokio::time::sleep(measure_every).await;
        }
    };
    let collections = async {
        let Some((interval, options)) = &collection else {
            return std::future::pending().await;
        };
        loop {
            tokio::time::sleep(*interval).await;
            collect_garbage(&state, options).await;
            measure(&state).await;
        }
    };
    let notices = async {
        let mut watch = gc::Watch::default();
        loop {
            match watch.collected(&state.storage).await {
                Ok(true) => {
                    tracing::info!("a garbage collection ended: reading records from storage again");
                    state.builder.collected();
                }
                Ok(false) => {}
                Err(error) => tracing::warn!(%error, "could not look for garbage collections"),
            }
            tokio::time::sleep(gc::NOTICE_EVERY).await;
        }
    };
    tokio::join!(measures, collections, notices);
}

/// Measures storage for the landing page and the metrics.
async fn measure(state: &AppState) {
    match state.storage_use.measure(&state.storage).await {
        Ok(measured) => {
            state.metrics.storage(measured.bytes, measured.objects);
            if let Some(gc) = measured.last_gc {
                state.metrics.last_gc(gc.at, gc.deleted_bytes, gc.deleted_objects);
            }
        }
        Err(error) => tracing::warn!(%error, "could not measure storage"),
    }
}

/// One collection inside `serve`, after writing this replica's pulls.
async fn collect_garbage(state: &AppState, options: &gc::Options) {
    flush_pulls(state.builder.pulls()).await;
    let leases = Leases::new((*state.storage).clone());
    let say = |line: &str| tracing::info!("{line}");
    match gc::collect(&state.storage, &leases, options, &say).await {
        Ok(Outcome::Done(report)) => {
            tracing::info!(report = %report.line(), "garbage collected");
            state.builder.collected();
        }
        Ok(Outcome::Busy { holder }) => tracing::info!(%holder, "another replica is collecting garbage"),
        Err(error) => tracing::warn!(%error, "garbage collection failed; it runs again at the next interval"),
    }
}

/// `nixery build`: the image built as the registry would build it, then
/// written out, with a progress bar on a terminal and plain lines otherwise.
async fn build(config: ServeConfig, image: &str, output: &std::path::Path, format: OutputFormat) -> anyhow::Result<()> {
    let state = open(config).await?;
    let (name, tag) = image.split_once(':').unwrap_or((image, LATEST));
    let request = ImageRequest::parse(name, tag, &state.meta_packages)?;
    let progress = Progress::new();
    progress.stage(&format!("building {request} (Nix, layers)"));
    let choice = Choice {
        format: match format {
            OutputFormat::Oci => Format::Oci,
            OutputFormat::DockerArchive => Format::Docker,
        },
        index: false,
    };
    let started = std::time::Instant::now();
    let manifest = state
        .builder
        .fetch(&request, choice, None, None, Want::Presence)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .record;
    progress.stage(&format!(
        "built {} in {:.1} s; writing {}",
        manifest.digest,
        started.elapsed().as_secs_f64(),
        output.display()
    ));
    let reference = format!("{name}:{tag}");
    let copy = |bytes| progress.copied(bytes);
    let written = export::export(&state.storage, &manifest, &reference, format, output, &copy).await?;
    progress.done(&format!(
        "wrote {reference} ({:.1} MiB of layers) to {}",
        written as f64 / 1048576.0,
        output.display()
    ));
    Ok(())
}

/// A progress bar on a terminal; lines for each stage elsewhere.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
}

impl Progress {
    fn new() -> Self {
        use std::io::IsTerminal;
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new_spinner();
            bar.set_style(
                indicatif::ProgressStyle::with_template("{spinner} {elapsed:>4} {msg} {binary_bytes}")
                    .expect("a valid template"),
            );
            bar.enable_steady_tick(std::time::Duration::from_millis(100));
            bar
        });
        Progress { bar }
    }

    fn stage(&self, message: &str) {
        match &self.bar {
            Some(bar) => bar.set_message(message.to_owned()),
            None => eprintln!("{message}"),
        }
    }

    fn copied(&self, bytes: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(bytes);
        }
    }

    fn done(&self, message: &str) {
        match &self.bar {
            Some(bar) => bar.finish_with_message(message.to_owned()),
            None => eprintln!("{message}"),
        }
    }
}

/// The builder and everything it works with, from the configuration.
async fn open(config: ServeConfig) -> anyhow::Result<AppState> {
    let storage = Storage::open(&config.storage)
        .await
        .with_context(|| format!("cannot use the {} storage backend", config.storage.backend.name()))?;
    let mut popularity = match &config.popularity_url {
        Some(url) => Popularity::load(url).await?,
        None => Popularity::default(),
    };
    let learned = if config.learn_popularity {
        let learned = Learned::load(storage.clone()).await?;
        popularity = popularity.with_learned(&learned.json())?;
        Some(Arc::new(learned))
    } else {
        None
    };
    let parallel = std::thread::available_parallelism().map_or(2, |n| n.get());
    let settings = Settings {
        layering: config.layering,
        layer_budget: config.layer_budget,
        gzip: config.gzip,
        oci_layers: config.oci_layers,
        parallel,
        max_builds: config.max_builds.unwrap_or(parallel),
        architectures: config.architectures,
        preferred_format: config.manifest_format,
        entrypoint: config.entrypoint,
        max_packages: config.max_packages,
        builds_per_client: config.builds_per_client,
        client_build_rate: config.client_build_rate,
        lease_ttl: config.lease_ttl,
        builder_id: config.builder_id,
        signer: config.signer.clone(),
    };
    let metrics = Arc::new(Metrics::default());
    let activity = Arc::new(Activity::default());
    let programs = Programs::new(Arc::clone(&metrics));
    let source = Arc::new(config.source.with_programs(programs.clone()));
    let parts = Parts {
        source: Arc::clone(&source),
        nix: Nix::new(config.nix_timeout, programs),
        storage: storage.clone(),
        popularity,
        learned,
        metrics: Arc::clone(&metrics),
        activity: Arc::clone(&activity),
    };
    let signing = config.signer.map(|signer| {
        Arc::new(Signing {
            signer,
            identity: config.signing_identity.expect("config has one with a key"),
            resolved: moka::sync::Cache::new(RESOLVED_KEPT),
            signatures: moka::sync::Cache::new(SIGNATURES_KEPT),
            documents: moka::sync::Cache::new(2 * SIGNATURES_KEPT),
        })
    });
    Ok(AppState {
        signing,
        builder: Builder::new(parts, settings),
        storage: Arc::new(storage),
        metrics,
        activity,
        storage_use: gc::Status::default(),
        source,
        meta_packages: Arc::new(config.meta_packages),
        auth: config.auth,
    })
}

/// Serves until SIGINT or SIGTERM; then stops accepting connections and
/// lets open requests and running builds finish, for at most `grace`.
async fn serve_until_stopped(
    listener: tokio::net::TcpListener,
    app: server::Registry,
    state: &AppState,
    grace: std::time::Duration,
    limits: listen::Limits,
) -> anyhow::Result<()> {
    let (stopped_at, mut stopping) = tokio::sync::watch::channel(None);
    let builder = &state.builder;
    let stop = async move {
        stop_signal().await;
        tracing::info!(
            grace_seconds = grace.as_secs(),
            "stopping: no new connections; finishing requests and builds"
        );
        let _ = stopped_at.send(Some(tokio::time::Instant::now()));
    };
    let server = listen::serve(listener, app, stop, limits, Arc::clone(&state.metrics));
    let deadline = async {
        let _ = stopping.wait_for(Option::is_some).await;
        let since = stopping.borrow().expect("set");
        tokio::time::sleep_until(since + grace).await;
        since
    };
    let since = tokio::select! {
        () = server => stopping.borrow().expect("stopped by a signal"),
        since = deadline => {
            tracing::warn!("requests were still open when the shutdown grace ran out");
            since
        }
    };
    while !builder.idle() && since.elapsed() < grace {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    match builder.idle() {
        true => tracing::info!("stopped"),
        false => tracing::warn!("builds were still running when the shutdown grace ran out"),
    }
    Ok(())
}

async fn stop_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("signal handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
