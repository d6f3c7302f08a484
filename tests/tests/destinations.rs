//! Destinations managed at runtime: created, changed and deleted through the
//! admin API (or a router's config file) while events flow, with one
//! definition in Redis that every router follows.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use e2e_tests::{holds_within, wait_for, TestDestination, TestSystem, SHARDS};
use reqwest::Method;
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// One event the steady flow had accepted.
#[derive(Debug, Clone)]
struct Sent {
    id: String,
    /// When its request was sent, and when its 202 arrived.
    sent: Instant,
    accepted: Instant,
}

/// Events posted one after another, round-robin over `users`, until stopped.
struct Flow {
    stop: CancellationToken,
    sent: Arc<Mutex<Vec<Sent>>>,
    task: JoinHandle<()>,
}

impl Flow {
    fn start(system: &TestSystem, users: usize, event_type: Option<&str>) -> Self {
        let stop = CancellationToken::new();
        let sent = Arc::new(Mutex::new(Vec::new()));
        let (http, url) = (
            system.http.clone(),
            format!("{}/v1/events", system.gateway_url),
        );
        let event_type = event_type.map(str::to_owned);
        let task = tokio::spawn({
            let (stop, sent) = (stop.clone(), sent.clone());
            async move {
                let mut seq = 0;
                while !stop.is_cancelled() {
                    let user = format!("user-{}", seq % users);
                    let mut body = json!({ "userId": user, "payload": { "seq": seq } });
                    if let Some(event_type) = &event_type {
                        body["eventType"] = json!(event_type);
                    }
                    let started = Instant::now();
                    let response = http
                        .post(&url)
                        .json(&body)
                        .send()
                        .await
                        .expect("gateway answers");
                    assert_eq!(response.status(), 202, "event accepted");
                    let answer: Value = response.json().await.expect("JSON answer");
                    sent.lock().expect("sent").push(Sent {
                        id: answer["id"].as_str().expect("an id").to_owned(),
                        sent: started,
                        accepted: Instant::now(),
                    });
                    seq += 1;
                }
            }
        });
        Self { stop, sent, task }
    }

    fn count(&self) -> usize {
        self.sent.lock().expect("sent").len()
    }

    /// Waits until `more` events were accepted after `since` events.
    async fn wait_for_more(&self, since: usize, more: usize) {
        wait_for("the flow to post more", Duration::from_secs(30), || async {
            self.count() >= since + more
        })
        .await;
    }

    async fn stop(self) -> Vec<Sent> {
        self.stop.cancel();
        self.task.await.expect("the flow ran");
        Arc::try_unwrap(self.sent)
            .expect("the flow is over")
            .into_inner()
            .expect("sent")
    }
}

fn url(system: &TestSystem, path: &str) -> String {
    format!("{}{path}", system.mock_url)
}

/// A create request for `name` posting to the mock's `path`, with an
/// attempt timeout that fits the tests' short leases.
fn definition(system: &TestSystem, name: &str, path: &str) -> Value {
    json!({ "name": name, "url": url(system, path), "timeout_ms": 2000 })
}

/// Ids `path` answered 2xx to.
fn delivered_ids(system: &TestSystem, path: &str) -> HashSet<String> {
    system
        .recorder
        .summary(path)
        .events
        .into_iter()
        .filter(|event| (200..300).contains(&event.status))
        .map(|event| event.id)
        .collect()
}

async fn wait_all_delivered(system: &TestSystem, path: &str, ids: &[&str]) {
    let all = holds_within(Duration::from_secs(60), || async {
        system.recorder.missing(path, ids.iter().copied()) == 0
    })
    .await;
    if !all {
        // Which shards the missing events are on tells a cut from a stall.
        let delivered = delivered_ids(system, path);
        let mut missing_per_shard: HashMap<&str, usize> = HashMap::new();
        for id in ids.iter().filter(|id| !delivered.contains(**id)) {
            let shard = id.split('-').next().unwrap_or("?");
            *missing_per_shard.entry(shard).or_default() += 1;
        }
        panic!(
            "{} of {} events never reached {path}; missing per shard: {missing_per_shard:?}",
            missing_per_shard.values().sum::<usize>(),
            ids.len()
        );
    }
}

/// Waits until both routers (`test-router`, `router-b`) hold leases of
/// `destination`, and every shard's is held.
async fn leased_by_both(system: &TestSystem, destination: &str, timeout: Duration) {
    system
        .wait_leased_by(destination, &["test-router", "router-b"], timeout)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_created_while_events_flow_gets_exactly_the_later_events_on_every_router() {
    let system = TestSystem::start(vec![TestDestination::new("existing", "/ok/existing")]).await;
    let second = system.start_extra_router("router-b", |_| {});
    leased_by_both(&system, "existing", Duration::from_secs(20)).await;
    let flow = Flow::start(&system, 20, None);
    flow.wait_for_more(0, 100).await;

    let requested = Instant::now();
    let (status, created) = system
        .admin_call(
            Method::POST,
            "/admin/destinations",
            Some(&definition(&system, "added", "/ok/added")),
        )
        .await;
    let answered = Instant::now();
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["state"], "active", "{created}");
    // Both routers take their share within 2 s of the 201.
    leased_by_both(&system, "added", Duration::from_secs(2)).await;
    let at_create = flow.count();
    flow.wait_for_more(at_create, 300).await;
    let sent = flow.stop().await;

    let after: Vec<&str> = sent
        .iter()
        .filter(|s| s.sent > answered)
        .map(|s| s.id.as_str())
        .collect();
    let before: HashSet<&str> = sent
        .iter()
        .filter(|s| s.accepted < requested)
        .map(|s| s.id.as_str())
        .collect();
    assert!(after.len() >= 300 && before.len() >= 100);
    wait_all_delivered(&system, "/ok/added", &after).await;
    let all: Vec<&str> = sent.iter().map(|s| s.id.as_str()).collect();
    wait_all_delivered(&system, "/ok/existing", &all).await;
    let early: Vec<String> = delivered_ids(&system, "/ok/added")
        .into_iter()
        .filter(|id| before.contains(id.as_str()))
        .collect();
    assert!(
        early.is_empty(),
        "events accepted before the create were delivered: {early:?}"
    );
    let received = system.recorder.summary("/ok/added");
    assert_eq!(received.order_violations, 0, "per-user order");
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_added_to_one_routers_file_is_delivered_by_every_router() {
    let system = TestSystem::start(vec![TestDestination::new("existing", "/ok/existing")]).await;
    let second = system.start_extra_router("router-b", |_| {});
    leased_by_both(&system, "existing", Duration::from_secs(20)).await;
    let flow = Flow::start(&system, 20, None);
    flow.wait_for_more(0, 100).await;

    // router-b restarts with `added` in its file; the system's router keeps its own.
    second.stop().await;
    let added = TestDestination::new("added", "/ok/added");
    let mut settings = added.settings.clone();
    settings.url = url(&system, "/ok/added");
    let second = system.start_extra_router("router-b", move |config| {
        config.destinations.push(settings);
    });
    wait_for(
        "`added` created in Redis",
        Duration::from_secs(20),
        || async {
            // Active: its cut is recorded on every shard (while `creating`,
            // a shard's cut may still come after events sent now).
            let (status, view) = system
                .admin_call(Method::GET, "/admin/destinations/added", None)
                .await;
            status == 200 && view["state"] == "active"
        },
    )
    .await;
    // Events sent from here on were surely accepted after the creation.
    let defined_at = Instant::now();
    leased_by_both(&system, "added", Duration::from_secs(5)).await;
    let now = flow.count();
    flow.wait_for_more(now, 300).await;
    let sent = flow.stop().await;

    // Everything accepted once `added` was defined reaches it, over all
    // shards: the router whose file lacks it delivers its share too.
    let after: Vec<&str> = sent
        .iter()
        .filter(|s| s.sent > defined_at)
        .map(|s| s.id.as_str())
        .collect();
    wait_all_delivered(&system, "/ok/added", &after).await;
    assert_eq!(system.recorder.summary("/ok/added").order_violations, 0);
    // And the system's router still follows it: nothing it owns is dropped.
    let (status, view) = system
        .admin_call(Method::GET, "/admin/destinations/added", None)
        .await;
    assert_eq!(status, 200, "{view}");
    assert!(
        view["status"]["owners"]
            .as_array()
            .is_some_and(|o| o.len() == usize::from(SHARDS)),
        "{view}"
    );
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_changed_mid_flow_loses_nothing_and_keeps_each_users_order() {
    let system = TestSystem::start(vec![TestDestination::new("existing", "/ok/existing")]).await;
    let (status, body) = system
        .admin_call(
            Method::POST,
            "/admin/destinations",
            Some(&definition(&system, "moving", "/ok/first")),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let flow = Flow::start(&system, 10, None);
    flow.wait_for_more(0, 200).await;
    let (status, body) = system
        .admin_call(
            Method::PATCH,
            "/admin/destinations/moving",
            Some(&json!({ "url": url(&system, "/ok/second"), "headers": { "x-moved": "yes" } })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["url"], url(&system, "/ok/second"));
    let now = flow.count();
    flow.wait_for_more(now, 200).await;
    let sent = flow.stop().await;

    // Each event reaches one receiver or the other (the switch may deliver
    // one twice: at least once).
    let first = delivered_ids(&system, "/ok/first");
    let ids: Vec<&str> = sent.iter().map(|s| s.id.as_str()).collect();
    wait_for(
        "every event at one receiver or the other",
        Duration::from_secs(60),
        || async {
            let second = delivered_ids(&system, "/ok/second");
            ids.iter()
                .all(|id| first.contains(*id) || second.contains(*id))
        },
    )
    .await;
    let first = delivered_ids(&system, "/ok/first");
    let second = delivered_ids(&system, "/ok/second");
    assert!(
        !first.is_empty() && !second.is_empty(),
        "both receivers got events"
    );
    // Per user, deliveries over both receivers, by arrival, are in acceptance order.
    let acceptance: HashMap<&str, usize> = sent
        .iter()
        .enumerate()
        .map(|(i, s)| (s.id.as_str(), i))
        .collect();
    let mut arrivals: Vec<(u64, String, usize)> = Vec::new();
    for path in ["/ok/first", "/ok/second"] {
        for event in system.recorder.summary(path).events {
            if (200..300).contains(&event.status) {
                arrivals.push((event.at_ms, event.user, acceptance[event.id.as_str()]));
            }
        }
    }
    arrivals.sort();
    let mut latest: HashMap<String, usize> = HashMap::new();
    for (at_ms, user, index) in arrivals {
        let last = latest.entry(user.clone()).or_insert(index);
        assert!(
            index >= *last,
            "{user}: event #{index} arrived at {at_ms} after #{last}"
        );
        *last = index;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_destination_stops_lets_trimming_proceed_keeps_its_dead_letters_and_can_return() {
    let system = TestSystem::start(vec![
        TestDestination::new("existing", "/ok/existing"),
        // Everything fails at once: its events become dead letters (without
        // the breaker, whose open circuit would hold them instead).
        TestDestination::new("doomed", "/fail")
            .retry(10, 10, 1)
            .without_breaker(),
    ])
    .await;
    let flow = Flow::start(&system, 10, None);
    wait_for("dead letters", Duration::from_secs(30), || async {
        system.dead_letters("doomed").await.len() >= 50
    })
    .await;

    let (status, body) = system
        .admin_call(Method::DELETE, "/admin/destinations/doomed", None)
        .await;
    assert_eq!(status, 200, "{body}");
    wait_for(
        "doomed's groups and leases gone",
        Duration::from_secs(2),
        || async {
            system.groups_of("doomed").await == 0
                && system
                    .lease_holders_of("doomed")
                    .await
                    .iter()
                    .all(Option::is_none)
        },
    )
    .await;
    let dead_letters = system.dead_letters("doomed").await.len();
    let requests = system.recorder.summary("/fail").requests;
    let now = flow.count();
    flow.wait_for_more(now, 200).await;
    let sent = flow.stop().await;
    let ids: Vec<&str> = sent.iter().map(|s| s.id.as_str()).collect();
    wait_all_delivered(&system, "/ok/existing", &ids).await;
    assert_eq!(
        system.recorder.summary("/fail").requests,
        requests,
        "nothing sent after the delete"
    );
    assert_eq!(
        system.dead_letters("doomed").await.len(),
        dead_letters,
        "dead letters kept"
    );
    wait_for("streams trimmed", Duration::from_secs(10), || async {
        system.stream_lengths().await == 0
    })
    .await;
    let (status, _) = system
        .admin_call(Method::GET, "/admin/destinations/doomed", None)
        .await;
    assert_eq!(status, 404);

    // Created again under the same name, it starts from now.
    let (status, body) = system
        .admin_call(
            Method::POST,
            "/admin/destinations",
            Some(&definition(&system, "doomed", "/ok/reborn")),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let later = system.send_numbered(5, 4).await;
    let later: Vec<&str> = later.values().flatten().map(String::as_str).collect();
    wait_all_delivered(&system, "/ok/reborn", &later).await;
    assert_eq!(
        delivered_ids(&system, "/ok/reborn").len(),
        later.len(),
        "only the later events"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destinations_receive_exactly_the_event_types_they_subscribe_to() {
    let system = TestSystem::start(vec![
        TestDestination::new("orders", "/ok/orders").event_types(&["order.*"]),
        TestDestination::new("signups", "/ok/signups").event_types(&["user.created"]),
        TestDestination::new("everything", "/ok/everything"),
    ])
    .await;
    let mut by_type: HashMap<&str, Vec<String>> = HashMap::new();
    for round in 0..5 {
        for event_type in [
            "order.created",
            "order.paid",
            "user.created",
            "user.deleted",
            "",
        ] {
            let mut body =
                json!({ "userId": format!("user-{round}"), "payload": { "round": round } });
            if !event_type.is_empty() {
                body["eventType"] = json!(event_type);
            }
            let (status, answer) = system.post("/v1/events", &body).await;
            assert_eq!(status, 202, "{answer}");
            by_type
                .entry(event_type)
                .or_default()
                .push(answer["id"].as_str().expect("id").to_owned());
        }
    }
    let of = |types: &[&str]| -> HashSet<String> {
        types
            .iter()
            .flat_map(|t| by_type[t].iter().cloned())
            .collect()
    };
    let everything = of(&[
        "order.created",
        "order.paid",
        "user.created",
        "user.deleted",
        "",
    ]);
    for (path, expected) in [
        ("/ok/orders", of(&["order.created", "order.paid"])),
        ("/ok/signups", of(&["user.created"])),
        ("/ok/everything", everything.clone()),
    ] {
        let ids: Vec<&str> = expected.iter().map(String::as_str).collect();
        wait_all_delivered(&system, path, &ids).await;
        // The rest is filtered out and acknowledged, never delivered.
        wait_for("all acknowledged", Duration::from_secs(10), || async {
            system.pending(path.trim_start_matches("/ok/")).await == 0
        })
        .await;
        assert_eq!(delivered_ids(&system, path), expected, "{path}");
    }
    // The overview counts the filtered events at its next measurement.
    wait_for(
        "15 filtered events counted",
        Duration::from_secs(5),
        || async { system.destination_view("orders").await["filtered"] == 15 },
    )
    .await;
    let view = system.destination_view("orders").await;
    assert_eq!(view["event_types"], json!(["order.*"]), "{view}");
    // An event type the gateway cannot store is refused, naming the field.
    let (status, answer) = system
        .post(
            "/v1/events",
            &json!({ "userId": "u", "payload": 1, "eventType": "x".repeat(129) }),
        )
        .await;
    assert_eq!(status, 400);
    assert!(
        answer["error"]
            .as_str()
            .is_some_and(|e| e.contains("eventType")),
        "{answer}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_from_ms_backfills_the_retained_events_since_then_in_order() {
    let system = TestSystem::start(vec![TestDestination::new("existing", "/ok/existing")]).await;
    // Paused, `existing` holds everything back from trimming.
    let (status, _) = system
        .admin_call(Method::POST, "/admin/destinations/existing/pause", None)
        .await;
    assert_eq!(status, 200);
    let older = system.send_numbered(5, 4).await;
    let since_ms = protocol::unix_millis() + 1;
    wait_for(
        "the clock to pass since_ms",
        Duration::from_secs(1),
        || async { protocol::unix_millis() > since_ms },
    )
    .await;
    let newer = system.send_numbered(5, 4).await;
    let (status, body) = system
        .admin_call(
            Method::POST,
            "/admin/destinations",
            Some(&{
                let mut body = definition(&system, "backfill", "/ok/backfill");
                body["start_from_ms"] = json!(since_ms);
                body
            }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let newest = system.send_numbered(5, 4).await;
    let expected: Vec<&str> = newer
        .values()
        .chain(newest.values())
        .flatten()
        .map(String::as_str)
        .collect();
    wait_all_delivered(&system, "/ok/backfill", &expected).await;
    let delivered = delivered_ids(&system, "/ok/backfill");
    assert_eq!(
        delivered.len(),
        expected.len(),
        "nothing from before start_from_ms"
    );
    assert!(older.values().flatten().all(|id| !delivered.contains(id)));
    assert_eq!(system.recorder.summary("/ok/backfill").order_violations, 0);
    let (status, _) = system
        .admin_call(Method::POST, "/admin/destinations/existing/resume", None)
        .await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_creates_of_one_name_give_one_201_and_one_409() {
    let system = TestSystem::start(vec![TestDestination::new("existing", "/ok/existing")]).await;
    let body = definition(&system, "twice", "/ok/twice");
    let (a, b) = tokio::join!(
        system.admin_call(Method::POST, "/admin/destinations", Some(&body)),
        system.admin_call(Method::POST, "/admin/destinations", Some(&body)),
    );
    let mut statuses = [a.0, b.0];
    statuses.sort_unstable();
    assert_eq!(statuses, [201, 409], "{} / {}", a.1, b.1);

    // Bad input is a 400 naming the field, and changes nothing.
    for (body, field) in [
        (
            json!({ "name": "bad", "url": "http://169.254.169.254/latest" }),
            "url",
        ),
        (
            json!({ "name": "bad", "url": url(&system, "/ok"), "timeout_ms": 2000, "retry": { "max_attempts": 0 } }),
            "max_attempts",
        ),
        (json!({ "name": "bad" }), "url"),
    ] {
        let (status, answer) = system
            .admin_call(Method::POST, "/admin/destinations", Some(&body))
            .await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert!(
            answer["error"].as_str().is_some_and(|e| e.contains(field)),
            "{body}: {answer}"
        );
    }
    let (status, _) = system
        .admin_call(Method::GET, "/admin/destinations/bad", None)
        .await;
    assert_eq!(status, 404);
    let (status, answer) = system
        .admin_call(
            Method::PATCH,
            "/admin/destinations/twice",
            Some(&json!({ "name": "renamed" })),
        )
        .await;
    assert_eq!(status, 400, "{answer}");
    let (status, _) = system
        .admin_call(
            Method::PATCH,
            "/admin/destinations/nobody",
            Some(&json!({ "timeout_ms": 5 })),
        )
        .await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_deleted_and_created_again_at_once_starts_afresh() {
    let system = TestSystem::start(vec![TestDestination::new("existing", "/ok/existing")]).await;
    let mut slow = definition(&system, "again", "/slow/100");
    slow["max_concurrency"] = json!(1);
    let (status, body) = system
        .admin_call(Method::POST, "/admin/destinations", Some(&slow))
        .await;
    assert_eq!(status, 201, "{body}");
    // A backlog the worker holds in memory when the name is deleted.
    system.send_numbered(10, 5).await;
    wait_for("deliveries under way", Duration::from_secs(10), || async {
        system.recorder.summary("/slow/100").requests > 0
    })
    .await;
    let (status, body) = system
        .admin_call(Method::DELETE, "/admin/destinations/again", None)
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = system
        .admin_call(
            Method::POST,
            "/admin/destinations",
            Some(&definition(&system, "again", "/ok/fresh")),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let later = system.send_numbered(5, 4).await;
    let later: Vec<&str> = later.values().flatten().map(String::as_str).collect();
    wait_all_delivered(&system, "/ok/fresh", &later).await;
    assert_eq!(
        delivered_ids(&system, "/ok/fresh").len(),
        later.len(),
        "only the events after the second creation"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_destinations_command_lists_applies_and_deletes() {
    let system = TestSystem::start(vec![TestDestination::new("existing", "/ok/existing")]).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = system.write_router_config(dir.path());
    let file = dir.path().join("destinations.toml");
    std::fs::write(
        &file,
        format!(
            "[[destinations]]\nname = \"scripted\"\nurl = \"{}\"\ntimeout_ms = 2000\nevent_types = [\"order.*\"]\n",
            url(&system, "/ok/scripted")
        ),
    )
    .expect("write the file");
    let router = |args: &[&str]| {
        let output = std::process::Command::new(e2e_tests::workspace_binary("router"))
            .arg("--config")
            .arg(&config)
            .arg("destinations")
            .args(args)
            .output()
            .expect("router runs");
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "{args:?}: {text}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        text
    };
    let file_arg = file.to_str().expect("utf-8 path");
    assert!(router(&["apply", file_arg]).contains("created [\"scripted\"]"));
    assert!(router(&["apply", file_arg]).contains("unchanged [\"scripted\"]"));
    let listed = router(&["list"]);
    let names: Vec<String> = listed
        .lines()
        .map(|line| {
            let view: Value = serde_json::from_str(line).expect("a JSON line");
            view["name"].as_str().unwrap_or_default().to_owned()
        })
        .collect();
    assert_eq!(names, ["existing", "scripted"], "{listed}");
    // The running router follows at once: it delivers what it now knows.
    system.wait_destinations_registered("scripted").await;
    let (status, _) = system
        .post(
            "/v1/events",
            &json!({ "userId": "u", "payload": 1, "eventType": "order.new" }),
        )
        .await;
    assert_eq!(status, 202);
    wait_for(
        "the scripted destination delivers",
        Duration::from_secs(20),
        || async { system.recorder.delivered_count("/ok/scripted") == 1 },
    )
    .await;
    assert!(router(&["delete", "scripted"]).contains("Deleted `scripted`"));
    let (status, _) = system
        .admin_call(Method::GET, "/admin/destinations/scripted", None)
        .await;
    assert_eq!(status, 404);
    // A file that is wrong is refused, naming the problem, and changes nothing.
    std::fs::write(
        &file,
        "[[destinations]]\nname = \"bad one\"\nurl = \"http://x.example/\"\n",
    )
    .expect("write the file");
    let output = std::process::Command::new(e2e_tests::workspace_binary("router"))
        .arg("--config")
        .arg(&config)
        .args(["destinations", "apply", file_arg])
        .output()
        .expect("router runs");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("bad one"));
}

/// Clients connected to Redis, over every master.
async fn redis_clients(system: &TestSystem) -> u64 {
    let infos = system
        .redis
        .connection()
        .await
        .info_of_every_master("clients")
        .await
        .expect("INFO clients");
    infos
        .iter()
        .map(|info| {
            protocol::info_field(info, "connected_clients")
                .and_then(|count| count.parse::<u64>().ok())
                .expect("connected_clients")
        })
        .sum()
}

/// Decision 0004: past `reader.own_connections` (64) destinations × shards
/// (24 × 8 = 192 here), one blocking read per shard wakes every
/// destination's reader, and group reads share connections, so a router's
/// connections do not grow with its destinations (before: one per shard
/// and destination, over 200 here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_routers_redis_connections_do_not_grow_with_its_destinations() {
    const DESTINATIONS: usize = 24;
    let destinations = (0..DESTINATIONS)
        .map(|i| {
            TestDestination::new(&format!("d{i}"), &format!("/ok/d{i}"))
                .event_types(&[&format!("t{i}")])
        })
        .collect();
    let mut system = TestSystem::start_without_router(destinations).await;
    // Every destination gets events on several shards: its workers read.
    // Sent before the router starts, so that the gateway's connections are
    // open before counting.
    let mut expected: HashMap<String, HashSet<String>> = HashMap::new();
    for user in 0..(2 * usize::from(SHARDS)) {
        for i in 0..DESTINATIONS {
            let body = json!({ "userId": format!("user-{user}"), "eventType": format!("t{i}"), "payload": { "i": i } });
            let (status, answer) = system.post("/v1/events", &body).await;
            assert_eq!(status, 202, "{answer}");
            expected
                .entry(format!("/ok/d{i}"))
                .or_default()
                .insert(answer["id"].as_str().expect("id").to_owned());
        }
    }
    let before = redis_clients(&system).await;
    system.start_router();
    for (path, ids) in &expected {
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        wait_all_delivered(&system, path, &ids).await;
        assert_eq!(&delivered_ids(&system, path), &expected[path], "{path}");
    }
    let (opened, bound, settled) = connections_opened_since(&system, before).await;
    assert!(
        settled,
        "the router opened {opened} Redis connections for {DESTINATIONS} destinations on \
         {SHARDS} shards; at most {bound} expected"
    );
    eprintln!("the router opened {opened} Redis connections (bound {bound})");
}

/// The Redis connections opened since `before` once they settle (within
/// 30 s: a connection replaced after an error may take a moment to close),
/// the bound, and whether they stayed within it. The bound: 16
/// more than the shards on one Redis; on a cluster, group reads take a connection per shard
/// (to the master of its slot), and each of the router's command
/// connections is one per master.
async fn connections_opened_since(system: &TestSystem, before: u64) -> (u64, u64, bool) {
    let bound = match system.redis.cluster() {
        None => u64::from(SHARDS) + 16,
        Some(_) => 2 * u64::from(SHARDS) + 16 * 3,
    };
    let opened = std::cell::Cell::new(0);
    let settled = holds_within(Duration::from_secs(30), || async {
        opened.set(redis_clients(system).await.saturating_sub(before));
        opened.get() <= bound
    })
    .await;
    (opened.get(), bound, settled)
}

/// The ids of `event_type` over `rounds` of posts (type → ids), in order.
fn of_type<'a>(
    rounds: impl IntoIterator<Item = &'a HashMap<&'static str, Vec<String>>>,
    event_type: &str,
) -> Vec<String> {
    rounds
        .into_iter()
        .flat_map(|round| round.get(event_type).cloned().unwrap_or_default())
        .collect()
}

fn ids(list: &[String]) -> Vec<&str> {
    list.iter().map(String::as_str).collect()
}

/// Whether `key` exists in Redis.
async fn exists(system: &TestSystem, key: &str) -> bool {
    redis::cmd("EXISTS")
        .arg(key)
        .query_async(&mut system.redis.connection().await)
        .await
        .unwrap_or_else(|e| panic!("EXISTS {key}: {e}"))
}

/// A destination with `event_types` reads references the routing stage
/// writes (decision 0004). One created later with `start_from_ms` in the
/// past is caught up by the stage from its cut, over entries the stage has
/// already routed for an earlier one, then routed with every batch; each
/// gets exactly its types, each user's in order. Once everything is
/// delivered the shard streams and the reference streams are trimmed, and
/// a delete removes the references and the routing mark.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filtered_destination_created_later_is_caught_up_by_the_routing_stage_and_trimmed_after()
{
    let system = TestSystem::start(vec![
        TestDestination::new("everything", "/ok/everything"),
        TestDestination::new("first", "/ok/first").event_types(&["a.*"]),
    ])
    .await;
    // Paused, `everything` keeps every entry in the streams for the catch-up.
    let (status, _) = system
        .admin_call(Method::POST, "/admin/destinations/everything/pause", None)
        .await;
    assert_eq!(status, 200);
    let post_round = |round: u64| {
        let system = &system;
        async move {
            let mut by_type: HashMap<&'static str, Vec<String>> = HashMap::new();
            for user in 0..20u64 {
                let event_type =
                    ["a.one", "b.two", "c"][usize::try_from((user + round) % 3).expect("small")];
                let body = json!({
                    "userId": format!("user-{user}"),
                    "payload": { "round": round },
                    "eventType": event_type,
                });
                let (status, answer) = system.post("/v1/events", &body).await;
                assert_eq!(status, 202, "{answer}");
                by_type
                    .entry(event_type)
                    .or_default()
                    .push(answer["id"].as_str().expect("id").to_owned());
            }
            by_type
        }
    };
    let mut before = Vec::new();
    for round in 0..5 {
        before.push(post_round(round).await);
    }
    let since_ms = protocol::unix_millis() + 1;
    wait_for(
        "the clock to pass since_ms",
        Duration::from_secs(1),
        || async { protocol::unix_millis() > since_ms },
    )
    .await;
    let mut after = Vec::new();
    for round in 5..10 {
        after.push(post_round(round).await);
    }
    let first_expected = of_type(before.iter().chain(&after), "a.one");
    // The routing stage has routed everything so far for `first`.
    wait_all_delivered(&system, "/ok/first", &ids(&first_expected)).await;

    let mut body = definition(&system, "later", "/ok/later");
    body["event_types"] = json!(["b.*"]);
    body["start_from_ms"] = json!(since_ms);
    let (status, answer) = system
        .admin_call(Method::POST, "/admin/destinations", Some(&body))
        .await;
    assert_eq!(status, 201, "{answer}");
    let mut newest = Vec::new();
    for round in 10..13 {
        newest.push(post_round(round).await);
    }
    let later_expected = of_type(after.iter().chain(&newest), "b.two");
    wait_all_delivered(&system, "/ok/later", &ids(&later_expected)).await;
    let later = system.recorder.summary("/ok/later");
    assert_eq!(
        delivered_ids(&system, "/ok/later"),
        later_expected.iter().cloned().collect::<HashSet<_>>(),
        "exactly the b.* events since start_from_ms"
    );
    assert_eq!(later.order_violations, 0, "each user's in order");
    assert_eq!(later.duplicates, 0);
    let first_all = of_type(before.iter().chain(&after).chain(&newest), "a.one");
    wait_all_delivered(&system, "/ok/first", &ids(&first_all)).await;
    assert_eq!(
        delivered_ids(&system, "/ok/first").len(),
        first_all.len(),
        "nothing but a.* to first"
    );

    // Everything delivered: the streams and the references are trimmed.
    let (status, _) = system
        .admin_call(Method::POST, "/admin/destinations/everything/resume", None)
        .await;
    assert_eq!(status, 200);
    wait_for(
        "streams and references trimmed",
        Duration::from_secs(30),
        || async {
            let mut refs = 0u64;
            for shard in 0..SHARDS {
                for name in ["first", "later"] {
                    refs += redis::cmd("XLEN")
                        .arg(system.keys.refs(shard, name))
                        .query_async::<u64>(&mut system.redis.connection().await)
                        .await
                        .expect("XLEN works");
                }
            }
            system.stream_lengths().await == 0 && refs == 0
        },
    )
    .await;

    let (status, answer) = system
        .admin_call(Method::DELETE, "/admin/destinations/later", None)
        .await;
    assert_eq!(status, 200, "{answer}");
    for shard in 0..SHARDS {
        assert!(!exists(&system, &system.keys.refs(shard, "later")).await);
        let mark: Option<String> = redis::cmd("HGET")
            .arg(system.keys.routing_marks(shard))
            .arg("later")
            .query_async(&mut system.redis.connection().await)
            .await
            .expect("HGET works");
        assert_eq!(mark, None, "no routing mark left on shard {shard}");
    }
    // The others go on.
    let last = post_round(13).await;
    let expected: Vec<&str> = last["a.one"].iter().map(String::as_str).collect();
    wait_all_delivered(&system, "/ok/first", &expected).await;
}

/// The test process's resident memory, in kB (the router runs in it).
fn resident_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .expect("VmRSS in /proc/self/status")
}

/// The scale test (decision 0004, step 4): 200 destinations each
/// taking its own event type, plus one taking everything. Every event
/// reaches exactly the destinations that take it, each user's in order,
/// while the router's Redis connections stay within shards + 16 (one
/// Redis) and its memory within a bound that one blocking connection, a
/// group read of every event and a `filtered` record per destination and
/// event would each have broken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_filtered_destinations_and_one_taking_everything_get_exactly_theirs() {
    const FILTERED: usize = 200;
    const USERS: usize = 100;
    const PER_USER: usize = 20;
    let mut destinations: Vec<TestDestination> = (0..FILTERED)
        .map(|i| {
            TestDestination::new(&format!("d{i}"), &format!("/ok/d{i}"))
                .event_types(&[&format!("t{i}")])
        })
        .collect();
    destinations.push(TestDestination::new("all", "/ok/all"));
    let mut system = TestSystem::start_without_router(destinations).await;
    // One event first, so that the gateway's connections are open before counting.
    let (status, answer) = system
        .post("/v1/events", &json!({ "userId": "warm-up", "payload": 0 }))
        .await;
    assert_eq!(status, 202, "{answer}");
    let before = redis_clients(&system).await;
    let memory_before = resident_kb();
    system.start_router();
    let mut expected: HashMap<String, Vec<String>> = HashMap::new();
    let mut all = vec![answer["id"].as_str().expect("id").to_owned()];
    for seq in 0..PER_USER {
        let events: Vec<Value> = (0..USERS)
            .map(|user| {
                let i = (user * 7 + seq * 13) % FILTERED;
                json!({ "userId": format!("user-{user}"), "eventType": format!("t{i}"), "payload": { "seq": seq } })
            })
            .collect();
        let (status, answer) = system.post("/v1/batch", &json!({ "events": events })).await;
        assert_eq!(status, 202, "{answer}");
        for (event, id) in events.iter().zip(e2e_tests::batch_ids(&answer)) {
            let i = event["eventType"].as_str().expect("type")[1..].to_owned();
            expected
                .entry(format!("/ok/d{i}"))
                .or_default()
                .push(id.clone());
            all.push(id);
        }
    }
    wait_all_delivered(&system, "/ok/all", &ids(&all)).await;
    for i in 0..FILTERED {
        let path = format!("/ok/d{i}");
        let wanted = expected.get(&path).cloned().unwrap_or_default();
        wait_all_delivered(&system, &path, &ids(&wanted)).await;
        let summary = system.recorder.summary(&path);
        assert_eq!(
            delivered_ids(&system, &path),
            wanted.iter().cloned().collect::<HashSet<_>>(),
            "{path}: exactly its type"
        );
        assert_eq!(summary.order_violations, 0, "{path}");
    }
    assert_eq!(system.recorder.summary("/ok/all").order_violations, 0);
    let (opened, bound, settled) = connections_opened_since(&system, before).await;
    let grown_mb = resident_kb().saturating_sub(memory_before) / 1024;
    eprintln!(
        "{} events to {FILTERED} filtered destinations and one taking all: the router opened \
         {opened} Redis connections (bound {bound}); the process grew by {grown_mb} MB",
        all.len(),
    );
    assert!(settled, "{opened} connections, at most {bound} expected");
    assert!(grown_mb < 512, "the router's memory grew by {grown_mb} MB");
}

/// Caught-up readers of references and the routing stage wait for the
/// shard's one wake-up connection, not for `reader.block_ms`: with a 5 s
/// block, each of a trickle of events reaches a filtered destination (two
/// Redis turns more than a direct one: the stage's read and its routing)
/// well within a second, on every shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caught_up_filtered_destination_is_woken_at_once_not_after_its_block_time() {
    let mut system = TestSystem::start_without_router(vec![
        TestDestination::new("direct", "/ok/direct"),
        TestDestination::new("typed", "/ok/typed").event_types(&["t"]),
    ])
    .await;
    // Readers share the wake-up, as with many destinations.
    system.own_connections = Some(0);
    system.start_router_with(|config| {
        config.reader.block_ms = 5_000;
        config.lease.ttl_ms = 30_000;
    });
    let first = system.send_typed("warm-up", "t").await;
    wait_all_delivered(&system, "/ok/typed", &[&first]).await;
    let mut sent = Vec::new();
    // Each event is sent once the one before was delivered: by then its
    // reader and the routing stage wait again.
    for user in 0..(2 * usize::from(SHARDS)) {
        let id = system.send_typed(&format!("user-{user}"), "t").await;
        wait_all_delivered(&system, "/ok/typed", &[&id]).await;
        sent.push(id);
    }
    let latencies: Vec<u64> = system
        .recorder
        .summary("/ok/typed")
        .events
        .iter()
        .filter(|event| sent.contains(&event.id))
        .map(|event| event.latency_ms.expect("receivedAt"))
        .collect();
    let slowest = latencies.iter().max().copied().unwrap_or(0);
    eprintln!("a trickle to a filtered destination: latencies {latencies:?} ms");
    assert_eq!(latencies.len(), sent.len());
    assert!(slowest < 1_000, "slowest {slowest} ms with a 5 s block");
}

/// A PATCH of a filtered destination's `event_types` applies to the events
/// the routing stage routes once its router has the change (decision 0004):
/// what was routed before keeps going, nothing of the old type is routed
/// after, and `[]` (every type, events without a type included) keeps it
/// reading references.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_patch_of_a_filtered_destinations_event_types_applies_from_the_next_routed_batch() {
    let system = TestSystem::start(vec![
        TestDestination::new("typed", "/ok/typed").event_types(&["a"])
    ])
    .await;
    let send_both = |round: usize| {
        let system = &system;
        async move {
            let mut sent = HashMap::new();
            for user in 0..usize::from(SHARDS) {
                for event_type in ["a", "b"] {
                    let id = system
                        .send_typed(&format!("user-{user}-{round}"), event_type)
                        .await;
                    sent.entry(event_type).or_insert_with(Vec::new).push(id);
                }
            }
            sent
        }
    };
    let before = send_both(0).await;
    wait_all_delivered(&system, "/ok/typed", &ids(&before["a"])).await;

    let patch = |event_types: Value| {
        let system = &system;
        async move {
            let (status, body) = system
                .admin_call(
                    Method::PATCH,
                    "/admin/destinations/typed",
                    Some(&json!({ "event_types": event_types })),
                )
                .await;
            assert_eq!(status, 200, "{body}");
            // The router has it once its overview shows it.
            wait_for(
                "the router to have the change",
                Duration::from_secs(10),
                || async { system.destination_view("typed").await["event_types"] == event_types },
            )
            .await;
        }
    };
    patch(json!(["b"])).await;
    let after = send_both(1).await;
    wait_all_delivered(&system, "/ok/typed", &ids(&after["b"])).await;
    patch(json!([])).await;
    let untyped = system.send("someone", json!({ "untyped": true })).await;
    let last = send_both(2).await;
    let everything: Vec<&str> = last["a"]
        .iter()
        .chain(&last["b"])
        .chain([&untyped])
        .map(String::as_str)
        .collect();
    wait_all_delivered(&system, "/ok/typed", &everything).await;
    let delivered = delivered_ids(&system, "/ok/typed");
    assert!(
        before["b"]
            .iter()
            .chain(&after["a"])
            .all(|id| !delivered.contains(id)),
        "nothing of a type the destination did not take when it was routed"
    );
    assert_eq!(system.recorder.summary("/ok/typed").order_violations, 0);
    assert!(
        system.group_stream_of("typed", 0).await.contains(":refs:"),
        "still reading references"
    );
}

/// A reference group Redis lost (here destroyed by hand on every shard) is
/// restored by its own reader alone, while the other filtered destination's
/// readers on the same shards deliver on, each event once and in order.
/// (Checked to fail when one script read both groups and a missing group
/// failed the whole script: the other destination then stalled.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_reference_group_is_restored_by_its_reader_while_the_other_filtered_destination_delivers_on(
) {
    let mut system = TestSystem::start_without_router(vec![
        TestDestination::new("kept", "/ok/kept").event_types(&["k"]),
        TestDestination::new("lost", "/ok/lost").event_types(&["l"]),
    ])
    .await;
    system.own_connections = Some(0);
    system.start_router();
    let first = [
        system.send_typed("warm-up", "k").await,
        system.send_typed("warm-up", "l").await,
    ];
    wait_all_delivered(&system, "/ok/kept", &[&first[0]]).await;
    wait_all_delivered(&system, "/ok/lost", &[&first[1]]).await;

    let mut con = system.redis.connection().await;
    for shard in 0..SHARDS {
        let _: i64 = redis::cmd("XGROUP")
            .arg("DESTROY")
            .arg(system.keys.refs(shard, "lost"))
            .arg("lost")
            .query_async(&mut con)
            .await
            .expect("XGROUP DESTROY works");
    }
    // Both types on every shard, so that each shard's reads carry both groups.
    let (mut kept, mut lost) = (Vec::new(), Vec::new());
    for round in 0..5 {
        for user in 0..(4 * usize::from(SHARDS)) {
            let user = format!("user-{user}");
            kept.push(system.send_typed(&user, "k").await);
            if round == 0 {
                lost.push(system.send_typed(&user, "l").await);
            }
        }
    }
    let kept: Vec<&str> = kept.iter().map(String::as_str).collect();
    let lost: Vec<&str> = lost.iter().map(String::as_str).collect();
    wait_all_delivered(&system, "/ok/kept", &kept).await;
    wait_all_delivered(&system, "/ok/lost", &lost).await;
    let summary = system.received("kept");
    assert_eq!(summary.duplicates, 0, "kept got an event twice");
    assert_eq!(summary.order_violations, 0);
    assert_eq!(system.received("lost").order_violations, 0);
}

/// Once every event is delivered and trimmed, the trim of an idle shard
/// reads its shard stream's groups and stops there: it does not walk the
/// reference stream of every filtered destination every interval
/// (`XINFO GROUPS` on each, before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_shards_trim_does_not_walk_every_filtered_destinations_references() {
    const FILTERED: usize = 8;
    let destinations = (0..FILTERED)
        .map(|i| {
            TestDestination::new(&format!("d{i}"), &format!("/ok/d{i}"))
                .event_types(&[&format!("d{i}")])
        })
        .collect();
    let system = TestSystem::start(destinations).await;
    for i in 0..FILTERED {
        let id = system
            .send_typed(&format!("user-{i}"), &format!("d{i}"))
            .await;
        wait_all_delivered(&system, &format!("/ok/d{i}"), &[&id]).await;
    }
    wait_trimmed_empty(&system).await;
    let (calls, intervals) = xinfo_groups_over_a_second(&system).await;
    // One per shard and interval; walking the references would be 1 + 8.
    let most = intervals * u64::from(SHARDS) * 2;
    assert!(
        calls <= most,
        "{calls} XINFO GROUPS in {intervals} intervals over {SHARDS} shards (at most {most})"
    );
}

/// With filtered destinations, a shard is trimmed only by the router
/// running its routing stage: a second router no longer repeats the walk
/// over every reference stream of every shard each interval. Every shard
/// is still trimmed, by one router or the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_filtered_destinations_each_shard_is_trimmed_by_the_router_routing_it() {
    let system = TestSystem::start(vec![
        TestDestination::new("held", "/ok/held").event_types(&["h"]),
        TestDestination::new("live", "/ok/live").event_types(&["l"]),
    ])
    .await;
    let second = system.start_extra_router("router-b", |_| {});
    system
        .wait_leased_by(
            protocol::keys::ROUTING_GROUP,
            &["test-router", "router-b"],
            Duration::from_secs(20),
        )
        .await;
    let (status, _) = system
        .admin_call(Method::POST, "/admin/destinations/held/pause", None)
        .await;
    assert_eq!(status, 200);
    // Events on every shard that the paused destination holds: every
    // shard's trim walks both reference streams while it waits.
    let mut held = Vec::new();
    for user in 0..(4 * usize::from(SHARDS)) {
        held.push(system.send_typed(&format!("user-{user}"), "h").await);
    }
    let (calls, intervals) = xinfo_groups_over_a_second(&system).await;
    // Per trim of a shard: its stream and the two reference streams.
    let most = intervals * u64::from(SHARDS) * 3;
    assert!(
        calls <= most,
        "{calls} XINFO GROUPS in {intervals} intervals over {SHARDS} shards: \
         more than one router trims them (at most {most})"
    );
    let (status, _) = system
        .admin_call(Method::POST, "/admin/destinations/held/resume", None)
        .await;
    assert_eq!(status, 200);
    let held: Vec<&str> = held.iter().map(String::as_str).collect();
    wait_all_delivered(&system, "/ok/held", &held).await;
    wait_trimmed_empty(&system).await;
    drop(second);
}

/// Waits until every shard stream is trimmed to nothing.
async fn wait_trimmed_empty(system: &TestSystem) {
    wait_for(
        "every shard stream to be trimmed empty",
        Duration::from_secs(30),
        || async {
            let mut con = system.redis.connection().await;
            for shard in 0..SHARDS {
                let len: u64 = redis::cmd("XLEN")
                    .arg(system.keys.events(shard))
                    .query_async(&mut con)
                    .await
                    .expect("XLEN");
                if len > 0 {
                    return false;
                }
            }
            true
        },
    )
    .await;
}

/// `XINFO GROUPS` calls over a window of about ten trim intervals (100 ms
/// in tests; a window, not a wait), and the most intervals it can hold.
async fn xinfo_groups_over_a_second(system: &TestSystem) -> (u64, u64) {
    let before = system.command_calls("xinfo|groups").await;
    let window = Instant::now();
    while window.elapsed() < Duration::from_secs(1) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let calls = system.command_calls("xinfo|groups").await - before;
    let intervals = u64::try_from(window.elapsed().as_millis() / 100).unwrap_or(u64::MAX) + 2;
    eprintln!(
        "{calls} XINFO GROUPS in {:?} over {SHARDS} shards",
        window.elapsed()
    );
    (calls, intervals)
}

/// A router that has not yet seen a filtered destination (its catalog view
/// is up to one interval old) must not trim below what that destination's
/// references still need: it leaves the shards whose routing stage runs on
/// another router to that router. Here router B follows the catalog only
/// every 10 s, and `typed` is created, then paused, on router A just after
/// B started. (Before the fix B trimmed away the events router A had
/// already routed to `typed`: 16 of 32 were never delivered.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_that_has_not_seen_a_filtered_destination_trims_nothing_it_needs() {
    let system = TestSystem::start(vec![TestDestination::new("direct", "/ok/direct")]).await;
    let second = system.start_extra_router("router-b", |config| {
        config.admin.overview_interval_ms = 10_000;
    });
    leased_by_both(&system, "direct", Duration::from_secs(20)).await;
    let typed = json!({
        "name": "typed",
        "url": url(&system, "/ok/typed"),
        "timeout_ms": 2000,
        "event_types": ["t"],
    });
    let (status, body) = system
        .admin_call(Method::POST, "/admin/destinations", Some(&typed))
        .await;
    assert_eq!(status, 201, "{body}");
    let (status, _) = system
        .admin_call(Method::POST, "/admin/destinations/typed/pause", None)
        .await;
    assert_eq!(status, 200);
    let mut sent = Vec::new();
    for user in 0..(4 * usize::from(SHARDS)) {
        sent.push(system.send_typed(&format!("user-{user}"), "t").await);
    }
    let sent: Vec<&str> = sent.iter().map(String::as_str).collect();
    // `direct` takes every event: once it has them all, only `typed`
    // (its references, or its routing marks) holds the shard streams.
    wait_all_delivered(&system, "/ok/direct", &sent).await;
    // A window of trim intervals (100 ms in tests) for router B to trim.
    let window = Instant::now();
    while window.elapsed() < Duration::from_secs(1) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        trimmed_of(&system, &sent).await,
        Vec::<&str>::new(),
        "trimmed before `typed` had them"
    );
    let (status, _) = system
        .admin_call(Method::POST, "/admin/destinations/typed/resume", None)
        .await;
    assert_eq!(status, 200);
    wait_all_delivered(&system, "/ok/typed", &sent).await;
    drop(second);
}

/// As above, when the shards routed by the router that knows the new
/// filtered destination pass to one that does not yet (it knows another
/// filtered destination, so it routes and trims them): trimming walks the
/// reference streams Redis records for the shard, not only those the
/// trimming router knows. (The events' later delivery, once router B has
/// seen `typed`, is not checked here: see the stop's note.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_handed_to_a_router_that_has_not_seen_a_filtered_destination_keep_its_events() {
    let mut system = TestSystem::start(vec![
        TestDestination::new("direct", "/ok/direct"),
        TestDestination::new("other", "/ok/other").event_types(&["o"]),
    ])
    .await;
    let second = system.start_extra_router("router-b", |config| {
        config.admin.overview_interval_ms = 30_000;
    });
    system
        .wait_leased_by(
            protocol::keys::ROUTING_GROUP,
            &["test-router", "router-b"],
            Duration::from_secs(20),
        )
        .await;
    let typed = json!({
        "name": "typed",
        "url": url(&system, "/ok/typed"),
        "timeout_ms": 2000,
        "event_types": ["t"],
    });
    let (status, body) = system
        .admin_call(Method::POST, "/admin/destinations", Some(&typed))
        .await;
    assert_eq!(status, 201, "{body}");
    let (status, _) = system
        .admin_call(Method::POST, "/admin/destinations/typed/pause", None)
        .await;
    assert_eq!(status, 200);
    let mut sent = Vec::new();
    for user in 0..(4 * usize::from(SHARDS)) {
        sent.push(system.send_typed(&format!("user-{user}"), "t").await);
    }
    let sent: Vec<&str> = sent.iter().map(String::as_str).collect();
    wait_all_delivered(&system, "/ok/direct", &sent).await;
    // Router A routed its shards' events to `typed` and dropped their
    // marks; it stops, and router B takes its routing stages.
    system.stop_router().await;
    system
        .wait_leased_by(
            protocol::keys::ROUTING_GROUP,
            &["router-b"],
            Duration::from_secs(20),
        )
        .await;
    // A window of trim intervals (100 ms in tests) for router B to trim.
    let window = Instant::now();
    while window.elapsed() < Duration::from_secs(1) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        trimmed_of(&system, &sent).await,
        Vec::<&str>::new(),
        "trimmed by the router that took the routing over"
    );
    drop(second);
}

/// Those of `ids` no longer in their shard stream.
async fn trimmed_of<'a>(system: &TestSystem, ids: &[&'a str]) -> Vec<&'a str> {
    let mut con = system.redis.connection().await;
    let mut trimmed = Vec::new();
    for id in ids {
        let (shard, stream_id) = id.split_once('-').expect("<shard>-<stream id>");
        let shard: u16 = shard.parse().expect("a shard");
        let found: Vec<redis::Value> = redis::cmd("XRANGE")
            .arg(system.keys.events(shard))
            .arg(stream_id)
            .arg(stream_id)
            .query_async(&mut con)
            .await
            .expect("XRANGE");
        if found.is_empty() {
            trimmed.push(*id);
        }
    }
    trimmed
}
