//! Tests of the configuration file.

use super::*;
use starling_proto::ids::{ModelVersion, RoundId};
use starling_proto::round::Weighting;
use starling_proto::strategy::RoundContext;
use starling_proto::update::Update;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

#[test]
fn template_parses_to_the_defaults_apart_from_the_listen_address() {
    let c = ServiceConfig::from_toml(TEMPLATE, env(&[]), Path::new("/etc/starling")).unwrap();
    let mut d = ServiceConfig::default();
    d.server.listen = "127.0.0.1:4433".parse().unwrap();
    d.resolve_paths(Path::new("/etc/starling"));
    assert_eq!(c, d);
    assert_eq!(c.server.cert, Path::new("/etc/starling/tls/server.pem"));
}

#[test]
fn environment_overrides_win_and_are_typed() {
    let c = ServiceConfig::from_toml(
        TEMPLATE,
        env(&[
            ("STARLING_SERVER_LISTEN", "0.0.0.0:5000"),
            ("STARLING_ROUND_TARGET_PARTICIPANTS", "200"),
            ("STARLING_ROUND_MIN_REPORTS", "150"),
            ("STARLING_ROUND_REQUIRE_CHARGING", "false"),
            ("STARLING_MODEL_FAMILY", "two-tower"),
            ("STARLING_PRIVACY_MODE", "central"),
            ("STARLING_STORAGE_PATH", "/var/lib/starling/c.db"),
            ("STARLING_LOG", "ignored: not a section"),
            ("PATH", "/usr/bin"),
        ]),
        Path::new("/etc/starling"),
    )
    .unwrap();
    assert_eq!(c.server.listen, "0.0.0.0:5000".parse().unwrap());
    assert_eq!(c.round.target_participants, 200);
    assert!(!c.round.require_charging);
    assert_eq!(c.model.family, "two-tower");
    assert!(c.central_dp());
    assert_eq!(c.storage.path, Path::new("/var/lib/starling/c.db"));
}

#[test]
fn mistakes_are_reported_with_their_key() {
    let base = Path::new(".");
    let e = ServiceConfig::from_toml(TEMPLATE, env(&[("STARLING_ROUND_TARGET_PARTICPANTS", "3")]), base)
        .unwrap_err();
    assert!(e.to_string().contains("target_particpants"), "{e}");
    let e = ServiceConfig::from_toml("[round]\nmin_reports = 500\n", env(&[]), base).unwrap_err();
    assert!(matches!(e, ConfigError::Invalid { key: "round", .. }), "{e}");
    let e = ServiceConfig::from_toml("[strategy]\nkind = \"fedsgd\"\n", env(&[]), base).unwrap_err();
    assert!(matches!(e, ConfigError::Invalid { key: "strategy.kind", .. }), "{e}");
    let e =
        ServiceConfig::from_toml("[privacy]\nmode = \"central\"\ndelta = 2.0\n", env(&[]), base).unwrap_err();
    assert!(matches!(e, ConfigError::Invalid { key: "privacy.delta", .. }), "{e}");
    let e = ServiceConfig::from_toml("[model]\nrows = 0\n", env(&[]), base).unwrap_err();
    assert!(matches!(e, ConfigError::Invalid { key: "model.rows", .. }), "{e}");
    let e = ServiceConfig::from_toml("[server]\nlisten = 4\n", env(&[]), base).unwrap_err();
    assert!(matches!(e, ConfigError::Parse(_)), "{e}");
    let e = ServiceConfig::from_toml("[server]\nmax_frame_bytes = 2048\n", env(&[]), base).unwrap_err();
    assert!(matches!(e, ConfigError::Invalid { key: "server.max_frame_bytes", .. }), "{e}");
}

#[test]
fn converts_into_engine_configs() {
    let c = ServiceConfig::from_toml(
        "[privacy]\nmode = \"central\"\nnoise_multiplier = 1.1\n[round]\nencoding = \"dense\"\n",
        env(&[]),
        Path::new("."),
    )
    .unwrap();
    let o = c.orchestrator_config().unwrap();
    assert_eq!(o.round.plan.clip_norm, Some(1.0));
    assert_eq!(o.round.plan.encoding, EncodingKind::Dense);
    assert!(
        c.build_strategy(PrivacyLedger::new(c.budget().unwrap())).unwrap().name().starts_with("dp-fedavg")
    );
    let m = c.initial_model().unwrap();
    assert_eq!(m.len(), 1682 * 32);
    assert_eq!(m, c.initial_model().unwrap(), "seeded");
}

/// Runs one aggregation of `strategy` over the updates (with their weights) and returns the
/// delta it applies to a zero model.
fn applied_delta(strategy: &mut dyn Strategy, shape: ModelShape, updates: Vec<(Update, f64)>) -> Vec<f32> {
    use rand::SeedableRng;
    let ctx = RoundContext {
        round: RoundId(1),
        model_version: ModelVersion(0),
        shape,
        target_participants: updates.len(),
        selected: updates.len(),
        population: Some(1000),
        secure: false,
        quant: None,
    };
    let mut agg = strategy.aggregator(&ctx);
    for (u, w) in updates {
        agg.accept(u, w).unwrap();
    }
    let aggregate = agg.finish(&mut rand_chacha::ChaCha8Rng::seed_from_u64(1)).unwrap();
    let mut model = vec![0.0; shape.len()];
    strategy.apply(&ctx, &mut model, &aggregate).unwrap();
    model
}

fn norm(v: &[f32]) -> f64 {
    v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt()
}

#[test]
fn without_dp_the_config_still_re_clips_every_update_server_side() {
    // `starling init`'s file turns central DP on; with it switched off the coordinator still
    // bounds every update.
    let c = ServiceConfig::from_toml(TEMPLATE, env(&[]), Path::new(".")).unwrap();
    assert!(c.central_dp(), "privacy is on by default");
    let c =
        ServiceConfig::from_toml(TEMPLATE, env(&[("STARLING_PRIVACY_MODE", "off")]), Path::new(".")).unwrap();
    assert!(!c.central_dp());
    let clip = c.privacy.clip_norm;
    let mut s = c.build_strategy(PrivacyLedger::new(c.budget().unwrap())).unwrap();
    let shape = c.shape().unwrap();
    // One finite but huge update (norm 1e6), alone and among honest small ones.
    let mut huge = vec![0.0f32; shape.len()];
    huge[0] = 1e6;
    let huge = Update::dense(shape, huge).unwrap();
    let delta = applied_delta(&mut *s, shape, vec![(huge.clone(), 1.0)]);
    let lr = f64::from(c.strategy.server_learning_rate);
    assert!(norm(&delta) <= clip * lr * (1.0 + 1e-6), "norm {} > C = {clip}", norm(&delta));
    let small = Update::sparse(shape, vec![5], vec![0.01; 32]).unwrap();
    let delta = applied_delta(&mut *s, shape, vec![(huge, 1.0), (small.clone(), 1.0), (small, 1.0)]);
    assert!(norm(&delta) <= clip * lr, "norm {}", norm(&delta));
    // The other rules keep the bound (one round of momentum is the plain step; the adaptive
    // optimizers normalise per coordinate, so their step is bounded by their learning rate,
    // not by C).
    for kind in ["fedavg_row", "fedavgm", "median", "trimmed_mean"] {
        let c = ServiceConfig::from_toml(
            &format!("[strategy]\nkind = \"{kind}\"\n[privacy]\nmode = \"off\"\n"),
            env(&[]),
            Path::new("."),
        )
        .unwrap();
        let mut s = c.build_strategy(PrivacyLedger::new(c.budget().unwrap())).unwrap();
        let mut v = vec![0.0f32; shape.len()];
        v[7] = -3e5;
        let u = Update::dense(shape, v).unwrap();
        let delta = applied_delta(&mut *s, shape, vec![(u.clone(), 1.0), (u.clone(), 1.0), (u, 1.0)]);
        let lr = f64::from(c.strategy.server_learning_rate).max(1.0);
        assert!(norm(&delta) <= clip * lr * (1.0 + 1e-6), "{kind}: norm {}", norm(&delta));
    }
}

#[test]
fn central_dp_re_clips_too() {
    let c = ServiceConfig::from_toml(
        "[privacy]\nmode = \"central\"\nnoise_multiplier = 0.0\nclip_norm = 2.0\n",
        env(&[]),
        Path::new("."),
    )
    .unwrap();
    let mut s = c.build_strategy(PrivacyLedger::new(c.budget().unwrap())).unwrap();
    let shape = c.shape().unwrap();
    let mut huge = vec![0.0f32; shape.len()];
    huge[3] = 1e6;
    let delta = applied_delta(&mut *s, shape, vec![(Update::dense(shape, huge).unwrap(), 1.0)]);
    // Clipped to C = 2, divided by the fixed denominator (q·N = the target, 100), no noise.
    assert!((norm(&delta) - 2.0 / 100.0).abs() < 1e-6, "norm {}", norm(&delta));
}

#[test]
fn a_robust_rule_with_central_dp_is_refused_at_start_up() {
    for kind in ["median", "trimmed_mean"] {
        let text = format!("[strategy]\nkind = \"{kind}\"\n[privacy]\nmode = \"central\"\n");
        let e = ServiceConfig::from_toml(&text, env(&[]), Path::new(".")).unwrap_err();
        assert!(matches!(e, ConfigError::Invalid { key: "strategy.kind", .. }), "{e}");
        let msg = e.to_string();
        assert!(msg.contains("central") && msg.contains("mean"), "{msg}");
        // Without DP the robust rule is fine.
        let ok = format!("[strategy]\nkind = \"{kind}\"\n[privacy]\nmode = \"off\"\n");
        assert!(ServiceConfig::from_toml(&ok, env(&[]), Path::new(".")).is_ok());
    }
}

#[test]
fn weighting_defaults_to_auto_with_a_small_cap_and_is_validated() {
    let c = ServiceConfig::from_toml(TEMPLATE, env(&[]), Path::new(".")).unwrap();
    assert_eq!(c.round.weighting, "auto");
    assert_eq!(c.round.max_weight, 100.0);
    let o = c.orchestrator_config().unwrap();
    assert_eq!(o.round.weighting, Weighting::Auto);
    assert_eq!(o.round.max_weight, 100.0);
    for (name, want) in [("equal", Weighting::Equal), ("examples", Weighting::Examples)] {
        let c =
            ServiceConfig::from_toml(TEMPLATE, env(&[("STARLING_ROUND_WEIGHTING", name)]), Path::new("."))
                .unwrap();
        assert_eq!(c.orchestrator_config().unwrap().round.weighting, want);
    }
    let base = Path::new(".");
    let e = ServiceConfig::from_toml("[round]\nweighting = \"biggest\"\n", env(&[]), base).unwrap_err();
    assert!(matches!(e, ConfigError::Invalid { key: "round.weighting", .. }), "{e}");
    for bad in ["0.0", "-5.0", "nan", "inf"] {
        let e =
            ServiceConfig::from_toml(&format!("[round]\nmax_weight = {bad}\n"), env(&[]), base).unwrap_err();
        assert!(matches!(e, ConfigError::Invalid { key: "round.max_weight", .. }), "{bad}: {e}");
    }
}

#[test]
fn a_cluster_needs_postgres_and_refuses_what_does_not_split() {
    let base = "[cluster]\nenabled = true\n";
    let err = |text: &str| ServiceConfig::from_toml(text, env(&[]), Path::new("/x")).unwrap_err().to_string();
    assert!(err(base).contains("storage.postgres"), "{}", err(base));
    let pg = "[storage]\npostgres = \"host=127.0.0.1 user=s dbname=s\"\n";
    let ok = ServiceConfig::from_toml(&format!("{base}{pg}"), env(&[]), Path::new("/x")).unwrap();
    assert!(ok.cluster.enabled);
    assert_eq!(ok.evaluation_every(), 0, "evaluation is off by default in a cluster");
    // DP off: only the cluster's own rule can refuse a robust aggregation here.
    let off = "[privacy]\nmode = \"off\"\n";
    for (extra, key) in [
        (&*format!("{off}[strategy]\nkind = \"median\"\n"), "several nodes"),
        (&*format!("{off}[strategy]\nkind = \"trimmed_mean\"\n"), "several nodes"),
        ("[evaluation]\nevery_rounds = 3\n", "evaluation.every_rounds"),
    ] {
        let e = err(&format!("{base}{pg}{extra}"));
        assert!(e.contains(key), "{extra}: {e}");
    }
    let e = err(&format!("[cluster]\nenabled = true\nlease_ttl_ms = 1000\nlease_margin_ms = 1000\n{pg}"));
    assert!(e.contains("cluster.lease_margin_ms"), "{e}");
    let e = err(&format!("[cluster]\nenabled = true\ntick_ms = 0\n{pg}"));
    assert!(e.contains("cluster.tick_ms"), "{e}");
    // Off, none of it is checked (a single node on SQLite may run a median).
    ServiceConfig::from_toml(&format!("{off}[strategy]\nkind = \"median\"\n"), env(&[]), Path::new("/x"))
        .unwrap();
}
