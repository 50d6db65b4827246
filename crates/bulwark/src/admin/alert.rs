//! `bulwark alert ...`: where the cluster's events are sent, and a test of each sink.

use super::*;

/// `bulwark alert ...`.
#[derive(Subcommand)]
pub enum AlertCmd {
    /// Adds an alert (or replaces the one of that name): a program that gets each event
    /// as JSON on stdin, or a URL the event is POSTed to. Each event reaches each alert
    /// from one node (see examples/alerts/sendmail-alert).
    Add {
        /// Alert name.
        name: String,
        /// Absolute path of the program; it must exist on every node (alerts are
        /// delivered by whichever node saw the event, or the leader).
        #[arg(long, conflicts_with = "url", required_unless_present = "url")]
        program: Option<String>,
        /// http:// or https:// URL.
        #[arg(long)]
        url: Option<String>,
        /// Only these event kinds (comma-separated; default: all; --help lists them).
        #[arg(long, value_delimiter = ',', value_parser = parse_event_kind, long_help = event_kinds_help())]
        events: Vec<EventKind>,
        /// A delivery that takes longer is killed (program) or abandoned (URL).
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
        /// Further attempts after a failed delivery (1, 2, 4 ... s apart).
        #[arg(long, default_value_t = 3)]
        retries: u32,
    },
    /// Lists alerts.
    List,
    /// Removes an alert.
    Remove {
        /// Alert name.
        name: String,
    },
    /// Sends the alert a test event (kind alert_test) and reports the delivery.
    Test {
        /// Alert name.
        name: String,
    },
}

pub async fn alert(conn: &Conn, cmd: AlertCmd) -> Result<()> {
    let (c, text) = match cmd {
        AlertCmd::List => {
            let st = conn.client()?.state().await?;
            if conn.json {
                return print_json(&st.alerts.values().collect::<Vec<_>>());
            }
            if st.alerts.is_empty() {
                println!("no alerts; `bulwark alert add NAME --program PATH` adds one");
            }
            for a in st.alerts.values() {
                let to = match (&a.program, &a.url) {
                    (Some(p), _) => format!("program {p}"),
                    (_, Some(u)) => format!("POST {u}"),
                    _ => String::new(),
                };
                let events = if a.events.is_empty() {
                    "all events".to_string()
                } else {
                    a.events.join(",")
                };
                println!(
                    "{}  {to}  {events}  timeout {} ms, {} retries",
                    a.name, a.timeout_ms, a.retries
                );
            }
            return Ok(());
        }
        AlertCmd::Add {
            name,
            program,
            url,
            events,
            timeout_ms,
            retries,
        } => {
            let alert = cluster::state::Alert {
                name: name.clone(),
                program,
                url,
                events: events.iter().map(|k| k.as_str().to_string()).collect(),
                tests: 0,
                timeout_ms,
                retries,
            };
            // Refused here with the same words the cluster would use, without a round trip.
            alert.check().map_err(|e| anyhow!("bad alert: {e}"))?;
            (
                Command::SetAlert { alert },
                format!("alert {name} added; `bulwark alert test {name}` sends it a test event"),
            )
        }
        AlertCmd::Remove { name } => (
            Command::RemoveAlert { name: name.clone() },
            format!("alert {name} removed"),
        ),
        AlertCmd::Test { name } => return alert_test(conn, &name).await,
    };
    let a = commit(conn, c).await?;
    done(conn, &a, text)
}

/// Asks for a test delivery and waits (up to the alert's timeout and retries) for the
/// delivering node's report in the event log.
async fn alert_test(conn: &Conn, name: &str) -> Result<()> {
    let client = conn.client()?;
    let st = client.state().await?;
    let a = st
        .alerts
        .get(name)
        .ok_or_else(|| anyhow!("no alert named {name:?}; `bulwark alert list` shows them"))?;
    let test = a.tests + 1;
    let limit = Duration::from_millis(a.timeout_ms * u64::from(a.retries + 1))
        + Duration::from_secs(2u64.pow(a.retries.min(5)) + 10);
    commit(
        conn,
        Command::TestAlert {
            name: name.to_string(),
        },
    )
    .await?;
    println!("test event {test} sent to alert {name}; waiting for its delivery...");
    let deadline = std::time::Instant::now() + limit;
    loop {
        let (_, statuses) = client.cluster_status().await?;
        let report = statuses
            .values()
            .filter_map(|s| s.as_ref().ok())
            .flat_map(|s| s.events.iter())
            .find(|e| {
                e.is(EventKind::Alert)
                    && e.details.get("alert").and_then(|a| a.as_str()) == Some(name)
                    && e.details.get("test").and_then(|t| t.as_u64()) == Some(test)
            })
            .cloned();
        if let Some(e) = report {
            println!("{}: {}", e.observer, e.message);
            return if e.details.get("delivered").and_then(|d| d.as_bool()) == Some(true) {
                Ok(())
            } else {
                Err(anyhow!("the test event was not delivered"))
            };
        }
        if std::time::Instant::now() > deadline {
            bail!("no delivery report within {limit:?}; see the leader's log");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `--events` of `alert add`: a kind an alert may ask for ([`EventKind`]).
fn parse_event_kind(s: &str) -> Result<EventKind, String> {
    s.parse()
}

/// The long help of `alert add --events`: every kind an alert may ask for, with its
/// meaning, from [`EventKind`] itself.
fn event_kinds_help() -> String {
    let mut help =
        String::from("Only these event kinds (comma-separated; default: all of them). Kinds:\n");
    for kind in EventKind::ALL.into_iter().filter(|k| k.subscribable()) {
        help.push_str(&format!("  {:<22} {}\n", kind.as_str(), kind.meaning()));
    }
    help
}
