//! gte-supervisor: one Rust binary that runs a Python web service the way gunicorn + systemd glue
//! do today, with fewer moving parts.
//!
//! # Theory of operation
//!
//! `main` reads the config ([`config`]), takes the pidfile ([`pidfile`]), binds the public
//! listener and hands everything to the [`master`] task. The master owns the worker table: it
//! spawns Python workers ([`worker::spawn`]) — the bundled WSGI worker in `src/python/worker.py`,
//! speaking a compact framing over a private unix socket ([`worker::protocol`]), or any HTTP
//! `command` on a loopback port — and reacts to [`event::Event`]s by reconciling wanted and actual
//! workers. The [`proxy`] serves clients with hyper; per request it reads the body, takes an idle
//! slot from the [`proxy::pool::IdlePool`] (never asking the master), forwards, streams the
//! answer back and returns the slot. Trouble (timeouts, dead workers, spent budgets) goes up to the
//! master as events. Dependencies point one way: master → proxy → worker → config.
//!
//! Beside the pool the master supervises `[[process]]` entries ([`process`]): sidecar programs
//! started in dependency order, restarted by policy, health-checked, stopped in reverse order;
//! the proxy can route path prefixes to them. Their table is owned by the master task as well.

pub mod check;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod event;
pub mod fdlimit;
pub mod logging;
pub mod master;
pub mod metrics;
pub mod migrate;
pub mod pidfile;
pub mod process;
pub mod proxy;
pub mod systemd;
pub mod upgrade;
pub mod worker;
