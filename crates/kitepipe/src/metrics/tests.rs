use std::time::Duration;

use super::*;

#[test]
fn kite_handles_count_and_bound() {
    let metrics = Metrics::new();
    let kite = metrics.kite("blog.example.net");
    {
        let _open = kite.connection();
        kite.request(200);
        kite.request(404);
        kite.request(503);
        kite.bytes_in(10);
        kite.bytes_out(20);
        let totals = metrics.kite_totals();
        assert_eq!(totals[0].1.open, 1);
    }
    let totals = metrics.kite_totals();
    assert_eq!(totals.len(), 1);
    let (name, totals) = &totals[0];
    assert_eq!(name, "blog.example.net");
    assert_eq!(totals.requests, 3);
    assert_eq!(totals.requests_by_class, [0, 1, 0, 1, 1]);
    assert_eq!(
        (totals.bytes_in, totals.bytes_out, totals.open),
        (10, 20, 0)
    );
    for n in 0..MAX_KITE_SERIES + 10 {
        metrics.kite(&format!("k{n}.example.net"));
    }
    assert_eq!(metrics.kite_totals().len(), MAX_KITE_SERIES + 1);
    let text = metrics.encode();
    assert!(
        text.contains("kitepipe_http_requests_total{kite=\"blog.example.net\",class=\"2xx\"} 1"),
        "{text}"
    );
    assert!(text.contains(OTHER_KITES));
}

#[test]
fn rings_are_bounded() {
    let metrics = Metrics::new();
    for n in 0..MAX_RECENT_ERRORS + 5 {
        metrics.error("x", &format!("error {n} {}", "y".repeat(1000)));
        metrics.event("node", "ping", Outcome::Ok, Duration::from_millis(3));
    }
    let errors = metrics.recent_errors();
    assert_eq!(errors.len(), MAX_RECENT_ERRORS);
    assert!(errors[0].what.starts_with("error 5 "));
    assert!(errors[0].what.len() <= MAX_NOTE_LEN + 4);
    assert_eq!(metrics.recent_activity().len(), MAX_RECENT_ACTIVITY);
    let kite = metrics.kite("a");
    for _ in 0..MAX_SAMPLES + 3 {
        kite.request(200);
        metrics.sample(Duration::from_secs(1));
    }
    let history = metrics.history(None);
    assert_eq!(history["a"].len(), MAX_SAMPLES);
    assert_eq!(history["a"][0].rps, 1.0);
}

#[test]
fn links_count_reconnects() {
    let metrics = Metrics::new();
    let first = metrics.link_up("laptop");
    drop(first);
    let _second = metrics.link_up("laptop");
    metrics.heartbeat("laptop", Duration::from_millis(5));
    let links = metrics.links();
    assert_eq!(links[0].up, 1);
    assert_eq!(links[0].reconnects, 1);
    assert_eq!(links[0].rtt_ms, Some(5.0));
    assert!(
        metrics
            .encode()
            .contains("kitepipe_link_up{node=\"laptop\"} 1")
    );
}

#[test]
fn refusals_of_made_up_names_share_one_series() {
    let metrics = Metrics::new();
    metrics.kite("shop.example.net");
    metrics.refusal("shop.example.net", Refusal::Offline);
    for n in 0..100 {
        metrics.refusal(&format!("x{n}.example.net"), Refusal::Offline);
        metrics.refusal(&format!("y{n}.example.net"), Refusal::Unknown);
    }
    let text = metrics.encode();
    assert!(
        text.contains(
            "kitepipe_visitor_refusals_total{kite=\"shop.example.net\",reason=\"offline\"} 1"
        ),
        "{text}"
    );
    assert!(
        text.contains("kitepipe_visitor_refusals_total{kite=\"_other\",reason=\"offline\"} 100"),
        "{text}"
    );
    assert!(
        text.contains("kitepipe_visitor_refusals_total{kite=\"_other\",reason=\"unknown\"} 100"),
        "{text}"
    );
    assert!(!text.contains("x1.example.net"));
}
