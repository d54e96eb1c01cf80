//! Timing by hand: `cargo test --release -p starling-proto secagg::tests::timing -- --ignored --nocapture`.

use super::*;
use std::time::{Duration, Instant};

#[derive(Default, Debug)]
struct Times {
    client0: [Duration; 5],
    server_close: [Duration; 4],
}

/// A lean round over clients `0..n` (no message log), timing client 0 and the server's closes.
/// `drop_rate` of the clients drop after sending their masked input. Returns whether the sum was
/// exact.
fn timed_round(n: u64, p: SecAggParams, drop_rate: f64, seed: u64) -> (Times, bool) {
    let mut rng = Rng(seed);
    let mut times = Times::default();
    let ids: Vec<ClientId> = (0..n).map(ClientId).collect();
    let mut server = SecAggServer::new(ROUND, BASE, p, ids.clone(), 2, rng.seed()).unwrap();
    let mut clients = BTreeMap::new();
    for &c in &ids {
        let start = Instant::now();
        let (client, advert) = SecAggClient::new(ROUND, c, p, SecAggPolicy::default(), rng.seed()).unwrap();
        if c == ClientId(0) {
            times.client0[0] = start.elapsed();
        }
        clients.insert(c, client);
        server.handle_message(c, SecAggClientMessage::KeyAdvert(advert)).unwrap();
    }
    let dropped: BTreeSet<ClientId> =
        ids.iter().copied().filter(|_| ((rng.next() % 1000) as f64) < drop_rate * 1000.0).collect();
    let mut expected = vec![0u32; p.len as usize];
    for phase in 0..3 {
        let start = Instant::now();
        server.close_phase().unwrap();
        times.server_close[phase] = start.elapsed();
        if phase == 2 {
            for c in &dropped {
                server.handle_dropout(*c);
            }
        }
        while let Some((to, msg)) = server.poll_transmit() {
            if phase == 2 && dropped.contains(&to) {
                continue;
            }
            let client = clients.get_mut(&to).unwrap();
            let start = Instant::now();
            let reply = match msg {
                SecAggServerMessage::Neighbourhood(m) => {
                    SecAggClientMessage::Shares(client.handle_neighbourhood(m).unwrap())
                }
                SecAggServerMessage::RoutedShares(m) => {
                    let mut x = Rng(seed ^ to.0);
                    let input: Vec<u32> = (0..p.len).map(|_| x.next() as u32 & p.mask()).collect();
                    for (e, v) in expected.iter_mut().zip(&input) {
                        *e = e.wrapping_add(*v) & p.mask();
                    }
                    let t0 = Instant::now();
                    client.handle_routed_shares(m).unwrap();
                    if to == ClientId(0) {
                        times.client0[2] = t0.elapsed();
                    }
                    let t1 = Instant::now();
                    let masked = client.mask(BASE, input).unwrap();
                    if to == ClientId(0) {
                        times.client0[3] = t1.elapsed();
                    }
                    SecAggClientMessage::Masked(masked)
                }
                SecAggServerMessage::UnmaskRequest(m) => {
                    SecAggClientMessage::Unmask(client.handle_unmask(m).unwrap())
                }
            };
            let elapsed = start.elapsed();
            if to == ClientId(0) {
                match &reply {
                    SecAggClientMessage::Shares(_) => times.client0[1] = elapsed,
                    SecAggClientMessage::Unmask(_) => times.client0[4] = elapsed,
                    _ => {}
                }
            }
            server.handle_message(to, reply).unwrap();
        }
    }
    let start = Instant::now();
    server.close_phase().unwrap();
    times.server_close[3] = start.elapsed();
    let out = server.take_result().unwrap();
    (times, out.sum == expected && out.contributors.len() == n as usize)
}

fn report(n: u64, drop_rate: f64) {
    let p = params(16, 9, 20, 64_000);
    let (t, ok) = timed_round(n, p, drop_rate, 77);
    assert!(ok, "sum must be exact");
    let c: Duration = t.client0.iter().sum();
    println!(
        "n = {n}, k = 16, len = 64000, {:.0}% dropped after masked input:\n  client 0 total {:.1} ms \
         (keys {:.2} ms, neighbourhood+sharing+encryption {:.2} ms, decrypt shares {:.2} ms, mask {:.1} ms, unmask {:.3} ms)\n  \
         server close: keys {:.1} ms, shares {:.1} ms, masked {:.1} ms, unmask {:.1} ms",
        drop_rate * 100.0,
        c.as_secs_f64() * 1e3,
        t.client0[0].as_secs_f64() * 1e3,
        t.client0[1].as_secs_f64() * 1e3,
        t.client0[2].as_secs_f64() * 1e3,
        t.client0[3].as_secs_f64() * 1e3,
        t.client0[4].as_secs_f64() * 1e3,
        t.server_close[0].as_secs_f64() * 1e3,
        t.server_close[1].as_secs_f64() * 1e3,
        t.server_close[2].as_secs_f64() * 1e3,
        t.server_close[3].as_secs_f64() * 1e3,
    );
}

#[test]
#[ignore = "timing; run by hand"]
fn timing_round_200_clients() {
    report(200, 0.1);
}

#[test]
#[ignore = "timing; run by hand (about a minute in --release on 2 cores)"]
fn timing_round_1000_clients() {
    report(1000, 0.1);
}
