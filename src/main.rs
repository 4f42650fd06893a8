//! The `tollgate` command: parse arguments, set up logging, run.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};

use tollgate::clock::SystemClock;

/// Pingora allocates per request from many threads; glibc's malloc showed
/// as ~11% of CPU under load (BENCHMARKS.md). mimalloc, entered as
/// [`tollgate::alloc`] says.
#[global_allocator]
static ALLOCATOR: tollgate::alloc::Allocator = tollgate::alloc::Allocator;
use tollgate::config::Config;
use tollgate::log;
use tollgate::server::{self, Options};

#[derive(Parser)]
#[command(
    name = "tollgate",
    version,
    about = "API keys, plans, credits and rate limits in front of any HTTP API"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = log::Format::Text)]
    log_format: log::Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway: proxy, admin API and background tasks.
    Serve {
        #[arg(long, short)]
        config: PathBuf,
        /// Proxy worker threads (default: one per core).
        #[arg(long)]
        threads: Option<usize>,
        /// Seconds in-flight requests get to finish after SIGTERM/SIGINT.
        #[arg(long, default_value_t = 10)]
        drain_timeout: u64,
        /// Take over, without downtime, from a tollgate already serving this
        /// store (its listening sockets, then its store); without one, start
        /// normally.
        #[arg(long)]
        upgrade: bool,
    },
    /// Validate a config file: exit 0, or print every error and exit 1.
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Manage keys through a running gateway's admin API (prints JSON).
    Keys(tollgate::client::KeysCommand),
    /// Show the billing outbox (pending and parked events per sink), or
    /// retry parked events, through the admin API (prints JSON).
    Outbox(tollgate::client::OutboxCommand),
    /// A self-contained quick start: the example config in front of a
    /// built-in echo upstream, a temporary store, one key per plan.
    Demo {
        /// Use this config instead of the built-in example.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Copy a store: an earlier tollgate's (sled) into this version's
    /// format, or an embedded store into Redis (`--to redis://...`) for
    /// several gateways. Run it with the gateway stopped; running it twice
    /// changes nothing.
    Migrate {
        /// The store directory to copy (store.path).
        #[arg(long)]
        from: PathBuf,
        /// A store directory (default: the same directory), or a Redis URL
        /// (redis://host:port/db, rediss://...).
        #[arg(long)]
        to: Option<String>,
        /// With a Redis URL: the env var holding Redis's password.
        #[arg(long)]
        password_env: Option<String>,
        /// With a Redis URL: it is one node of a Redis Cluster.
        #[arg(long)]
        cluster: bool,
    },
    /// Serve the built-in echo upstream (for benchmarks and experiments).
    #[command(hide = true)]
    Echo {
        #[arg(long, default_value = "127.0.0.1:3000")]
        listen: std::net::SocketAddr,
    },
}

/// Logs to stderr; `RUST_LOG` filters, else `default`.
/// Loads a config, printing warnings; errors go back to the caller.
fn load(path: &std::path::Path) -> Result<Config, tollgate::config::ConfigErrors> {
    let loaded = Config::load(path)?;
    for warning in &loaded.warnings {
        eprintln!("warning: {warning}");
    }
    Ok(loaded.config)
}

/// Runs a client call and prints its JSON answer, or one error line.
fn print_answer(
    call: impl std::future::Future<Output = Result<serde_json::Value, tollgate::client::ClientError>>,
) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match runtime.block_on(call) {
        Ok(answer) => {
            println!("{}", serde_json::to_string_pretty(&answer)?);
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("error: {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::CheckConfig { config } => match load(&config) {
            Ok(_) => {
                println!("{}: ok", config.display());
                Ok(ExitCode::SUCCESS)
            }
            Err(errors) => {
                eprint!("{}: {errors}", config.display());
                Ok(ExitCode::FAILURE)
            }
        },
        Command::Keys(cmd) => print_answer(tollgate::client::run(cmd)),
        Command::Outbox(cmd) => print_answer(tollgate::client::run_outbox(cmd)),
        Command::Demo { config } => {
            // The demo's output is its instructions; logs only for trouble.
            let _log = log::init(cli.log_format, "warn");
            tollgate::demo::run(config.as_deref())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate {
            from,
            to: Some(url),
            password_env,
            cluster,
        } if url.starts_with("redis://") || url.starts_with("rediss://") => {
            let redis = tollgate::config::RedisConfig::for_migration(
                url,
                password_env.as_deref(),
                cluster,
            )?;
            let copied = tollgate::store::migrate::to_redis(&from, &redis)?;
            println!(
                "copied {} of {} keys and {} outbox events from {} into {} (the rest were there already)",
                copied.new_keys,
                copied.keys,
                copied.new_events,
                from.display(),
                tollgate::store::migrate::redacted(&redis.url)
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate { from, to, .. } => {
            let to = to.map_or_else(|| from.clone(), PathBuf::from);
            let copied = tollgate::store::migrate::from_sled(&from, &to)?;
            println!(
                "copied {copied} keys from {} into {}",
                from.display(),
                to.join(tollgate::store::sqlite::FILE).display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Echo { listen } => {
            let _log = log::init(cli.log_format, "info");
            tokio::runtime::Runtime::new()?.block_on(tollgate::echo::run(listen))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve {
            config: path,
            threads,
            drain_timeout,
            upgrade,
        } => {
            let config = match load(&path) {
                Ok(config) => config,
                Err(errors) => {
                    eprint!("{}: {errors}", path.display());
                    return Ok(ExitCode::FAILURE);
                }
            };
            let _log = log::init(cli.log_format, "info");
            let root_key = std::env::var(&config.root_key_env)
                .ok()
                .filter(|k| !k.is_empty());
            let threads = threads
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            let running = server::start(
                config,
                Options {
                    clock: Arc::new(SystemClock::new()),
                    root_key,
                    threads,
                    config_path: Some(path),
                    handle_signals: true,
                    drain_timeout: std::time::Duration::from_secs(drain_timeout),
                    work_stealing: false,
                    upgrade,
                },
            )
            .context("cannot start tollgate")?;
            running.wait();
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
