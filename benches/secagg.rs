//! Secure aggregation benchmarks (issue 14's performance goals), each next to a plain copy of the
//! same bytes where the goal is relative to memory speed.
//!
//! - `secagg_device`: one device's CPU for a whole round (key generation, 2k agreements, Shamir
//!   sharing and encryption, decryption of the neighbours' shares, encoding with its share of
//!   distributed-DP noise, mask expansion, unmasking), model of 64,000 parameters (2,000 × 32),
//!   k = 16. Only the measured device's calls are timed (`iter_custom`); the rest of the cohort
//!   and the coordinator run untimed.
//! - `secagg_coordinator`: the coordinator's whole protocol for 1,000 devices (k = 16, 64,000
//!   parameters) of which 10% drop after the masked input: accepting every message (the masked
//!   inputs are summed as they arrive), closing every phase, reconstructing and unmasking.
//! - `secagg_accumulate`: decoding a masked-input frame and adding it into the modular sum, and the
//!   modular add alone, beside a plain copy of the same bytes.
//!
//! Run with `cargo bench -p starling-benches --bench secagg`.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use starling_proto::codec::{Codec, Inbound};
use starling_proto::dp::distributed::{DistributedDpConfig, FastDiscreteGaussian, QuantPlan, encode};
use starling_proto::ids::{ClientId, ModelVersion, RoundId};
use starling_proto::message::ClientMessage;
use starling_proto::secagg::{
    MaskedInput, SecAggClient, SecAggClientMessage, SecAggParams, SecAggPolicy, SecAggServer,
    SecAggServerMessage,
};
use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

const DIM: usize = 64_000;
const K: u32 = 16;

fn plan(cohort: usize) -> QuantPlan {
    DistributedDpConfig {
        clip: 1.0,
        noise_multiplier: 1.0,
        dim: DIM,
        bits: 32,
        max_cohort: cohort.max(2),
        dropout_tolerance: 0.2,
        rotation: false,
        scale: None,
    }
    .plan(cohort, 1)
    .expect("plan")
}

fn update(seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..DIM).map(|_| rng.random_range(-0.01f32..0.01)).collect()
}

/// One round of `n` devices; returns the time spent in device `timed`'s calls (if any) and the
/// coordinator's time, and the server's result length.
fn round(n: usize, drop_after_masked: usize, timed: Option<usize>, seed: u64) -> (Duration, Duration) {
    let quant = plan(n);
    let params = SecAggParams { neighbours: K, threshold: K / 2 + 1, bits: 32, len: quant.padded_dim };
    let r = RoundId(1);
    let v = ModelVersion(1);
    let ids: Vec<ClientId> = (0..n as u64).map(ClientId).collect();
    let (mut device, mut coord) = (Duration::ZERO, Duration::ZERO);
    let mut time = |who: Option<usize>, f: &mut dyn FnMut()| {
        let t = Instant::now();
        f();
        let e = t.elapsed();
        match who {
            Some(i) if Some(i) == timed => device += e,
            None => coord += e,
            _ => {}
        }
    };
    let mut server = None;
    time(None, &mut || {
        server =
            Some(SecAggServer::new(r, v, params, ids.clone(), (n * 8 / 10).max(2), [seed as u8; 32]).unwrap())
    });
    let mut server = server.unwrap();
    let mut clients = Vec::with_capacity(n);
    for (i, &id) in ids.iter().enumerate() {
        let mut entropy = [0u8; 32];
        entropy[..8].copy_from_slice(&(seed ^ (i as u64 + 1)).to_le_bytes());
        let mut out = None;
        time(Some(i), &mut || {
            out = Some(SecAggClient::new(r, id, params, SecAggPolicy::default(), entropy).unwrap())
        });
        let (c, advert) = out.unwrap();
        time(None, &mut || {
            server.handle_message(id, SecAggClientMessage::KeyAdvert(advert.clone())).unwrap()
        });
        clients.push(c);
    }
    let route = |server: &mut SecAggServer, coord_time: &mut dyn FnMut(&mut dyn FnMut())| {
        let mut out: BTreeMap<ClientId, SecAggServerMessage> = BTreeMap::new();
        coord_time(&mut || {
            server.close_phase().unwrap();
            while let Some((to, m)) = server.poll_transmit() {
                out.insert(to, m);
            }
        });
        out
    };
    let neighbourhoods = route(&mut server, &mut |f| time(None, f));
    for (i, c) in clients.iter_mut().enumerate() {
        let Some(SecAggServerMessage::Neighbourhood(nb)) = neighbourhoods.get(&ids[i]).cloned() else {
            continue;
        };
        let mut bundle = None;
        time(Some(i), &mut || bundle = Some(c.handle_neighbourhood(nb.clone()).unwrap()));
        let bundle = bundle.unwrap();
        time(None, &mut || {
            server.handle_message(ids[i], SecAggClientMessage::Shares(bundle.clone())).unwrap()
        });
    }
    let routed = route(&mut server, &mut |f| time(None, f));
    let sampler = FastDiscreteGaussian;
    for (i, c) in clients.iter_mut().enumerate() {
        let Some(SecAggServerMessage::RoutedShares(rs)) = routed.get(&ids[i]).cloned() else { continue };
        let x = update(i as u64);
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ i as u64);
        let mut masked: Option<MaskedInput> = None;
        time(Some(i), &mut || {
            c.handle_routed_shares(rs.clone()).unwrap();
            let input = encode(&x, &quant, &sampler, &mut rng).unwrap().values;
            masked = Some(c.mask(v, input).unwrap());
        });
        // Every tenth device (for 10%) vanishes after sending nothing more: spread over the ids,
        // and the graph is a random ring anyway.
        if drop_after_masked > 0 && i % (n / drop_after_masked) == 0 {
            continue;
        }
        let m = masked.unwrap();
        time(None, &mut || server.handle_message(ids[i], SecAggClientMessage::Masked(m.clone())).unwrap());
    }
    let requests = route(&mut server, &mut |f| time(None, f));
    for (i, c) in clients.iter_mut().enumerate() {
        let Some(SecAggServerMessage::UnmaskRequest(u)) = requests.get(&ids[i]).cloned() else { continue };
        let mut resp = None;
        time(Some(i), &mut || resp = Some(c.handle_unmask(u.clone()).unwrap()));
        let resp = resp.unwrap();
        time(None, &mut || server.handle_message(ids[i], SecAggClientMessage::Unmask(resp.clone())).unwrap());
    }
    time(None, &mut || {
        server.close_phase().unwrap();
        black_box(server.take_result().expect("the sum"));
    });
    (device, coord)
}

fn device(c: &mut Criterion) {
    let mut g = c.benchmark_group("secagg_device");
    g.sample_size(20);
    // A cohort of 17: every device has exactly k = 16 neighbours.
    g.bench_function("one_device_round_k16_64k_params", |b| {
        b.iter_custom(|iters| (0..iters).map(|s| round(17, 0, Some(5), s).0).sum())
    });
    g.finish();
}

fn coordinator(c: &mut Criterion) {
    let mut g = c.benchmark_group("secagg_coordinator");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(1));
    // Setting up 1,000 devices takes seconds per sample: measure few samples.
    g.bench_function("1000_devices_k16_64k_params_10pct_dropped_after_masking", |b| {
        b.iter_custom(|iters| (0..iters).map(|s| round(1000, 100, None, s).1).sum())
    });
    g.finish();
}

fn accumulate(c: &mut Criterion) {
    let n = 1_000_000usize;
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let masked: Vec<u32> = (0..n).map(|_| rng.random()).collect();
    let msg = ClientMessage::SecAgg(SecAggClientMessage::Masked(MaskedInput {
        round: RoundId(1),
        base_version: ModelVersion(1),
        masked: masked.clone(),
    }));
    let codec = Codec::default();
    let frame = codec.encode_client(&msg).expect("encode");
    let mut sum = vec![0u32; n];
    let mut g = c.benchmark_group("secagg_accumulate_1M_u32");
    g.throughput(Throughput::Bytes(frame.len() as u64));
    g.bench_function("decode_frame+accumulate", |b| {
        b.iter(|| {
            let (inbound, _) = codec.decode_client(black_box(&frame)).expect("decode");
            let Inbound::Message { message: ClientMessage::SecAgg(SecAggClientMessage::Masked(m)), .. } =
                inbound
            else {
                unreachable!()
            };
            for (s, x) in sum.iter_mut().zip(&m.masked) {
                *s = s.wrapping_add(*x);
            }
            black_box(&sum);
        })
    });
    g.bench_function("modular_accumulate", |b| {
        b.iter(|| {
            for (s, x) in sum.iter_mut().zip(black_box(&masked)) {
                *s = s.wrapping_add(*x);
            }
            black_box(&sum);
        })
    });
    let mut dst = vec![0u8; frame.len()];
    g.bench_function("plain_copy_same_bytes", |b| {
        b.iter(|| {
            dst.copy_from_slice(black_box(&frame));
            black_box(&dst);
        })
    });
    g.bench_function("plain_copy_same_bytes_allocating", |b| b.iter(|| black_box(black_box(&frame).clone())));
    g.finish();
}

criterion_group!(benches, accumulate, device, coordinator);
criterion_main!(benches);
