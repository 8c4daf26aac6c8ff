//! The `clusteros` command line: `agent` runs the daemon, everything else talks to it over the
//! local socket. Every command has `--json`.

pub mod client;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use serde::Serialize;

use crate::cli::client::{ClientError, LocalClient};
use crate::core::config::{self, Config, Overrides};
use crate::core::state::Response;
use crate::status;

/// Exit status when a condition did not hold (key not found, compare-and-swap lost).
pub const EXIT_CONDITION: u8 = 2;

#[derive(Parser, Debug)]
#[command(name = "clusteros", version, about = "ClusterOS node agent and command line")]
pub struct Cli {
    /// The agent's local socket.
    #[arg(long, global = true, env = "CLUSTEROS_SOCKET", default_value = config::DEFAULT_SOCKET_PATH)]
    pub socket: PathBuf,
    /// Print machine-readable JSON.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the agent (normally started by clusteros-agent.service).
    Agent(AgentArgs),
    /// This node, the leader, Raft indexes and the members, at once.
    Status,
    /// The members with their role and health.
    Members,
    /// Raft details: voters, learners, indexes, replication lag.
    Raft,
    /// The WireGuard mesh: peers, endpoints, latest handshake age, bytes.
    Wg,
    /// Who holds which role (SLURM controller, backup, workers, k3s) and this node's services.
    Roles,
    /// The cluster's key-value store.
    #[command(subcommand)]
    Kv(KvCommand),
    /// Cluster secrets (MUNGE key, k3s token).
    #[command(subcommand)]
    Secrets(SecretsCommand),
    /// Join the cluster that ADDR (HOST[:PORT] of any member) belongs to.
    Join { addr: String },
    /// Leave the cluster gracefully.
    Leave,
}

#[derive(Subcommand, Debug)]
pub enum KvCommand {
    /// Read a key (linearizable through the leader, unless --stale).
    Get {
        key: String,
        /// Read this node's applied state without asking the leader (may be stale).
        #[arg(long)]
        stale: bool,
    },
    /// Write a key.
    Put { key: String, value: String },
    /// Delete a key.
    Delete { key: String },
    /// Compare-and-swap: set KEY to --new (or delete it with --delete) only if its value is
    /// --expected (or it is absent with --absent).
    Cas {
        key: String,
        #[arg(long, conflicts_with = "absent", required_unless_present = "absent")]
        expected: Option<String>,
        #[arg(long)]
        absent: bool,
        #[arg(long, conflicts_with = "delete", required_unless_present = "delete")]
        new: Option<String>,
        #[arg(long)]
        delete: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum SecretsCommand {
    /// Replace a secret with a new random value on every node (munge, k3s-token).
    Rotate { name: String },
}

#[derive(Args, Debug, Default)]
pub struct AgentArgs {
    /// Config file.
    #[arg(long, env = "CLUSTEROS_CONFIG", default_value = config::DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
    #[arg(long)]
    pub node_name: Option<String>,
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Peer API listen address (IP:PORT).
    #[arg(long)]
    pub listen: Option<String>,
    /// Address other nodes reach this node at (IP:PORT).
    #[arg(long)]
    pub advertise: Option<String>,
    /// Join address (repeatable).
    #[arg(long = "join")]
    pub join: Vec<String>,
    #[arg(long)]
    pub bootstrap_expect: Option<usize>,
    #[arg(long)]
    pub max_voters: Option<usize>,
    /// File holding the cluster secret.
    #[arg(long)]
    pub cluster_secret_file: Option<PathBuf>,
}

fn print_json<T: Serialize>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).expect("serializable"));
}

fn fail(json: bool, e: &ClientError) -> ExitCode {
    if json {
        let kind = match e {
            ClientError::Api(b) => b.kind.as_str(),
            ClientError::NotRunning(_) | ClientError::Refused(_) => "not_running",
            ClientError::Permission(_) => "permission",
            _ => "error",
        };
        print_json(&serde_json::json!({ "error": e.to_string(), "kind": kind }));
    }
    eprintln!("error: {e}");
    ExitCode::FAILURE
}

fn agent_config(args: &AgentArgs, socket: PathBuf, socket_given: bool) -> Result<Config, String> {
    let overrides = Overrides {
        node_name: args.node_name.clone(),
        state_dir: args.state_dir.clone(),
        socket_path: socket_given.then_some(socket),
        listen_addr: args.listen.clone(),
        advertise_addr: args.advertise.clone(),
        join: (!args.join.is_empty()).then(|| args.join.clone()),
        bootstrap_expect: args.bootstrap_expect,
        max_voters: args.max_voters,
        cluster_secret_file: args.cluster_secret_file.clone(),
    };
    let creds = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
    let required = args.config.as_os_str() != config::DEFAULT_CONFIG_PATH;
    Config::load(&args.config, required, creds.as_deref(), &overrides).map_err(|e| e.to_string())
}

/// The `clusteros` binary: parses the command line, starts the logging (for `clusteros agent`)
/// and the async runtime (two workers for the agent, the current thread for a command), runs the
/// command; returns the process exit status.
pub fn main() -> ExitCode {
    use clap::{CommandFactory, FromArgMatches};
    let matches = Cli::command().get_matches();
    let socket_given = matches.value_source("socket") != Some(clap::parser::ValueSource::DefaultValue);
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let is_agent = matches!(cli.command, Command::Agent(_));
    if is_agent {
        crate::logging::init();
    }
    let rt = if is_agent {
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()
    } else {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    };
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(run(cli, socket_given))
}

/// Runs the command line; returns the process exit status.
pub async fn run(cli: Cli, socket_given: bool) -> ExitCode {
    let json = cli.json;
    let client = LocalClient::new(&cli.socket);
    let result: Result<ExitCode, ClientError> = match cli.command {
        Command::Agent(args) => {
            let cfg = agent_config(&args, cli.socket.clone(), socket_given);
            return match crate::daemon::run(cfg, cli.socket).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::Status => client.status().await.map(|r| {
            if json {
                print_json(&r)
            } else {
                print!("{}", status::render_status(&r, crate::now_ms()))
            }
            if r.configured { ExitCode::SUCCESS } else { ExitCode::FAILURE }
        }),
        Command::Members => client.status().await.map(|r| {
            if json {
                print_json(&r.members)
            } else {
                print!("{}", status::render_members(&r))
            }
            ExitCode::SUCCESS
        }),
        Command::Raft => client.status().await.map(|r| {
            if json {
                print_json(&r.raft)
            } else {
                print!("{}", status::render_raft(&r))
            }
            ExitCode::SUCCESS
        }),
        Command::Wg => client.status().await.map(|r| {
            if json {
                print_json(&r.mesh);
            } else {
                print!("{}", status::render_mesh(&r));
            }
            ExitCode::SUCCESS
        }),
        Command::Roles => client.status().await.map(|r| {
            if json {
                print_json(&serde_json::json!({ "roles": r.roles, "services": r.services }));
            } else {
                print!("{}", status::render_roles(&r, crate::now_ms()));
            }
            ExitCode::SUCCESS
        }),
        Command::Kv(kv) => run_kv(&client, kv, json).await,
        Command::Secrets(SecretsCommand::Rotate { name }) => client.rotate_secret(&name).await.map(|r| {
            if json {
                print_json(&r);
            } else {
                println!("{} rotated: now version {}; every node applies it", r.name, r.version);
            }
            ExitCode::SUCCESS
        }),
        Command::Join { addr } => client.join(&addr).await.map(|_| {
            if json {
                print_json(&serde_json::json!({ "joining": addr }));
            } else {
                println!("joining via {addr}; follow progress with `clusteros status`");
            }
            ExitCode::SUCCESS
        }),
        Command::Leave => client.leave().await.map(|_| {
            if json {
                print_json(&serde_json::json!({ "left": true }));
            } else {
                println!("left the cluster; run `clusteros join ADDR` to join again");
            }
            ExitCode::SUCCESS
        }),
    };
    result.unwrap_or_else(|e| fail(json, &e))
}

async fn run_kv(client: &LocalClient, kv: KvCommand, json: bool) -> Result<ExitCode, ClientError> {
    let write_result = |r: Response| -> ExitCode {
        if json {
            print_json(&r);
        }
        match r {
            Response::Cas { succeeded: false, current } => {
                if !json {
                    eprintln!(
                        "compare-and-swap failed: the current value is {}",
                        current.map_or("absent".into(), |c| format!("{c:?}"))
                    );
                }
                ExitCode::from(EXIT_CONDITION)
            }
            Response::Rejected { reason } => {
                if !json {
                    eprintln!("error: rejected: {reason}");
                }
                ExitCode::FAILURE
            }
            Response::AlreadyApplied => {
                if !json {
                    println!("OK (applied once, by an earlier copy of this request; read the value back to see it)");
                }
                ExitCode::SUCCESS
            }
            _ => {
                if !json {
                    println!("OK");
                }
                ExitCode::SUCCESS
            }
        }
    };
    Ok(match kv {
        KvCommand::Get { key, stale } => {
            let r = client.kv_get(&key, stale).await?;
            if json {
                print_json(&r);
            }
            match &r.entry {
                Some(e) => {
                    if !json {
                        println!("{}", e.value);
                    }
                    ExitCode::SUCCESS
                }
                None => {
                    if !json {
                        eprintln!("key {key:?} not found");
                    }
                    ExitCode::from(EXIT_CONDITION)
                }
            }
        }
        KvCommand::Put { key, value } => write_result(client.kv_put(&key, &value).await?),
        KvCommand::Delete { key } => write_result(client.kv_delete(&key).await?),
        KvCommand::Cas { key, expected, absent, new, delete } => {
            let expected = if absent { None } else { expected };
            let new = if delete { None } else { new };
            write_result(client.kv_cas(&key, expected, new).await?)
        }
    })
}
