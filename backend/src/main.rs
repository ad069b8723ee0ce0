//! The `vublk` binary: parse the command line, set up logging, run.

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;
use vublk::cli::{Cli, CAPABILITIES};
use vublk::Mode;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version: stdout, exit 0
        Err(e) => {
            eprintln!("vublk: {} (see --help)", one_line(&e.to_string()));
            return ExitCode::from(2);
        }
    };
    if cli.print_capabilities {
        println!("{CAPABILITIES}");
        return ExitCode::SUCCESS;
    }
    if let Some(vublk::cli::Command::Status {
        control_socket,
        json,
    }) = &cli.command
    {
        return match vublk::supervisor::print_status(control_socket, *json) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("vublk: {e}");
                ExitCode::from(1)
            }
        };
    }
    if let Some(vublk::cli::Command::Export(command)) = &cli.command {
        return match vublk::supervisor::control::export_command(command) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("vublk: {e}");
                ExitCode::from(1)
            }
        };
    }
    if let Some(vublk::cli::Command::Upgrade {
        control_socket,
        binary,
    }) = &cli.command
    {
        return match vublk::supervisor::control::upgrade_command(control_socket, binary.as_deref())
        {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("vublk: upgrade: {e}");
                ExitCode::from(1)
            }
        };
    }
    if let Some(vublk::cli::Command::Top {
        control_socket,
        batch,
        iterations,
        delay,
    }) = &cli.command
    {
        let options = vublk::top::TopOptions {
            control_socket: control_socket.clone(),
            batch: *batch,
            iterations: *iterations,
            delay: *delay,
        };
        return match vublk::top::run(&options) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("vublk: {}", vublk::error_line(&e));
                ExitCode::from(1)
            }
        };
    }
    let mode = if let Some(fd) = cli.worker_control_fd {
        let plan = match cli
            .worker_sandbox
            .as_deref()
            .map(serde_json::from_str)
            .transpose()
        {
            Ok(plan) => plan.unwrap_or_default(),
            Err(e) => {
                eprintln!("vublk: bad --worker-sandbox: {e}");
                return ExitCode::from(2);
            }
        };
        Mode::Worker(fd, plan)
    } else {
        match cli.exports() {
            Ok(mut exports) if cli.single_process => {
                if exports.len() != 1 {
                    eprintln!("vublk: --single-process serves exactly one export");
                    return ExitCode::from(2);
                }
                if cli.metrics_addr.is_some() {
                    eprintln!("vublk: --metrics-addr needs the supervisor (not --single-process)");
                    return ExitCode::from(2);
                }
                let (endpoint, export) = exports.remove(0);
                Mode::SingleProcess(endpoint, cli.socket_access(), Box::new(export))
            }
            Ok(exports) => Mode::Supervisor(
                exports,
                cli.tenant_limits(),
                cli.worker_options(),
                vublk::supervisor::ControlOptions {
                    control_socket: cli.control_socket.clone(),
                    state_dir: cli.state_dir.clone(),
                    metrics_addr: cli.metrics_addr,
                    export_defaults: cli.export_defaults(),
                },
            ),
            Err(message) => {
                eprintln!("vublk: {message}");
                return ExitCode::from(2);
            }
        }
    };
    if cli.test_without_peer_pidfd {
        vublk::identity::peer::test_without_peer_pidfd();
    }
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr);
    if matches!(mode, Mode::Worker(..)) {
        // A worker's stderr is a pipe the supervisor relays into its own log, with its own
        // time and a prefix naming the worker.
        logs.without_time().with_ansi(false).init();
    } else {
        logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
    match vublk::run(mode) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vublk: {}", vublk::error_line(&e));
            ExitCode::from(1)
        }
    }
}

/// clap's message up to its usage block, on one line.
fn one_line(message: &str) -> String {
    message
        .lines()
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
        .trim_start_matches("error: ")
        .to_string()
}
