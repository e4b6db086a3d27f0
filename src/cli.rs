//! Command-line interface: `gte-supervisor -c FILE` runs the master in the foreground; the
//! subcommands check a config, translate a gunicorn config, or talk to a running master.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Default config path (the Debian package installs it).
pub const DEFAULT_CONFIG: &str = "/etc/gte-supervisor/workers.toml";

#[derive(Debug, Parser)]
#[command(
    name = "gte-supervisor",
    version,
    about = "Run a Python WSGI/HTTP service: a Rust master proxying to a pool of Python workers",
    long_about = "Run a Python WSGI/HTTP service: a Rust master binds the public address, starts a \
CPU-scaled pool of Python workers on private sockets and proxies each request to an idle worker. \
It recycles workers after max_requests (+ jitter), enforces per-request timeouts, writes a pidfile \
and access/error logs. It also supervises [[process]] entries (a model server, a chat UI): \
started in dependency order, health-checked, restarted by policy, stopped in reverse order, \
optionally routed to by path prefix. Without a subcommand it runs in the foreground.\n\n\
Signals: TERM graceful stop, INT/QUIT fast stop, HUP reload, TTIN/TTOU one worker more/less, \
USR1 reopen log files.\n\
Exit status: 0 ok, 1 runtime error, 2 usage or invalid configuration, 3 the app failed to load, \
4 another master holds the pidfile or the address is in use."
)]
pub struct Cli {
    /// Configuration file (workers.toml).
    #[arg(short = 'c', long = "config", value_name = "FILE", global = true, default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate the configuration and the environment it needs, print the effective config.
    Check,
    /// Print a workers.toml equivalent to a gunicorn config file.
    Migrate {
        /// The gunicorn config (Python), e.g. gunicorn.conf.py.
        #[arg(value_name = "GUNICORN_CONF")]
        gunicorn_conf: PathBuf,
        /// Interpreter used to evaluate it.
        #[arg(long, default_value = "python3")]
        python: PathBuf,
    },
    /// Ask the running master (found through the pidfile) to reload its configuration (SIGHUP).
    Reload,
    /// Stop the running master gracefully (SIGTERM) and wait for it to exit.
    Stop,
    /// Tell whether a master is running for this configuration.
    Status,
    /// Restart one [[process]] of the running master (also clears its failed state).
    Restart {
        /// The process's `name` in workers.toml.
        #[arg(value_name = "NAME")]
        name: String,
    },
}
