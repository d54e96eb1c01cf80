//! Property tests: the codec is lossless for every message kind and total on arbitrary bytes;
//! streaming aggregation matches a naive computation.

use proptest::prelude::*;
use rand::SeedableRng;
use starling_proto::codec::{Codec, FrameBuffer, Inbound, PROTOCOL_VERSION};
use starling_proto::encoding::{EncodedUpdate, EncodingKind};
use starling_proto::ids::{ClientId, ModelVersion, RoundId};
use starling_proto::message::*;
use starling_proto::secagg::{
    EncryptedShare, KeyAdvert, MaskedInput, RevealedShare, SecAggClientMessage, SecAggServerMessage, Share,
    ShareBundle, UnmaskRequest, UnmaskResponse,
};
use starling_proto::strategy::AggregationRule;
use starling_proto::update::{ModelShape, Update};

fn finite() -> impl Strategy<Value = f32> {
    -1e6f32..1e6f32
}

fn shape() -> impl Strategy<Value = ModelShape> {
    (1u32..20, 1u32..6).prop_map(|(r, l)| ModelShape::new(r, l).unwrap())
}

fn encoding_kind() -> impl Strategy<Value = EncodingKind> {
    prop_oneof![Just(EncodingKind::Dense), Just(EncodingKind::RowSparse), Just(EncodingKind::Quantized8)]
}

/// A valid update of the given shape: dense, or sparse with a random subset of rows.
fn update_for(s: ModelShape) -> impl Strategy<Value = Update> {
    let len = s.len();
    let dense = prop::collection::vec(finite(), len).prop_map(move |v| Update::dense(s, v).unwrap());
    let sparse = prop::collection::btree_set(0..s.rows, 0..=s.rows as usize).prop_flat_map(move |rows| {
        let rows: Vec<u32> = rows.into_iter().collect();
        let n = rows.len() * s.row_len as usize;
        prop::collection::vec(finite(), n).prop_map(move |v| Update::sparse(s, rows.clone(), v).unwrap())
    });
    prop_oneof![dense, sparse]
}

fn any_update() -> impl Strategy<Value = Update> {
    shape().prop_flat_map(update_for)
}

fn encoded() -> impl Strategy<Value = EncodedUpdate> {
    (any_update(), encoding_kind(), any::<u64>()).prop_map(|(u, k, seed)| {
        EncodedUpdate::encode(&u, k, &mut rand_chacha::ChaCha8Rng::seed_from_u64(seed))
    })
}

fn conditions() -> impl Strategy<Value = DeviceConditions> {
    (any::<bool>(), any::<bool>(), any::<bool>(), 0u8..=100).prop_map(
        |(charging, unmetered, idle, battery_percent)| DeviceConditions {
            charging,
            unmetered,
            idle,
            battery_percent,
        },
    )
}

fn plan() -> impl Strategy<Value = TrainingPlan> {
    (
        1u32..5,
        finite(),
        finite(),
        1u32..512,
        0u32..8,
        prop::option::of(0.01f32..10.0),
        encoding_kind(),
        0u8..3,
        0f32..5.0,
    )
        .prop_map(
            |(
                epochs,
                learning_rate,
                private_learning_rate,
                batch_size,
                negatives,
                clip_norm,
                encoding,
                n,
                m,
            )| {
                let noise = match n {
                    0 => NoiseSettings::None,
                    1 => NoiseSettings::Central { multiplier: m },
                    _ => NoiseSettings::Local { multiplier: m },
                };
                TrainingPlan {
                    epochs,
                    learning_rate,
                    private_learning_rate,
                    batch_size,
                    negatives,
                    clip_norm,
                    noise,
                    encoding,
                }
            },
        )
}

fn payload() -> impl Strategy<Value = ModelPayload> {
    prop_oneof![
        shape().prop_flat_map(|s| prop::collection::vec(finite(), s.len())
            .prop_map(move |v| ModelPayload::Full { shape: s, values: v.into() })),
        (any_update(), any::<u64>()).prop_map(|(u, from)| {
            let s = u.shape();
            let d = EncodedUpdate::encode(
                &u,
                EncodingKind::RowSparse,
                &mut rand_chacha::ChaCha8Rng::seed_from_u64(0),
            );
            let EncodedUpdate::RowSparse { rows, values, .. } = d else { unreachable!() };
            ModelPayload::Patch {
                from: ModelVersion(from),
                shape: s,
                rows: rows.into(),
                values: values.into(),
            }
        }),
    ]
}

fn refusal() -> impl Strategy<Value = Refusal> {
    prop_oneof![
        (any::<u16>(), any::<u16>()).prop_map(|(min, max)| Refusal::UnsupportedVersion { min, max }),
        Just(Refusal::Unauthenticated),
        ".{0,12}".prop_map(|expected| Refusal::WrongModelFamily { expected }),
        Just(Refusal::NotEligible),
        Just(Refusal::IncompatibleCapabilities),
        Just(Refusal::BudgetExhausted),
        Just(Refusal::AlreadyCheckedIn),
        Just(Refusal::ShuttingDown),
    ]
}

fn reject_reason() -> impl Strategy<Value = RejectReason> {
    prop_oneof![
        Just(RejectReason::Late),
        Just(RejectReason::Duplicate),
        (any::<u64>(), any::<u64>()).prop_map(|(a, b)| RejectReason::StaleVersion {
            expected: ModelVersion(a),
            got: ModelVersion(b)
        }),
        Just(RejectReason::WrongRound),
        Just(RejectReason::NotSelected),
        ".{0,20}".prop_map(RejectReason::Malformed),
        Just(RejectReason::InvalidWeight),
        ".{0,20}".prop_map(RejectReason::Refused),
    ]
}

fn client_message() -> impl Strategy<Value = ClientMessage> {
    let check_in = (
        any::<u64>(),
        prop::collection::vec(any::<u8>(), 0..40),
        ".{0,10}",
        ".{0,10}",
        prop::option::of(any::<u64>()),
        conditions(),
        (any::<u64>(), prop::collection::vec(encoding_kind(), 0..4), any::<u32>()),
    )
        .prop_map(|(c, credential, sdk_version, model_family, have, conditions, (mv, encodings, mf))| {
            ClientMessage::CheckIn(CheckIn {
                client: ClientId(c),
                credential,
                sdk_version,
                model_family,
                have_version: have.map(ModelVersion),
                conditions,
                capabilities: Capabilities { max_update_values: mv, encodings, max_frame_bytes: mf },
            })
        });
    let update = (
        any::<u64>(),
        any::<u64>(),
        encoded(),
        finite(),
        finite(),
        prop::option::of(0f32..1.0),
        any::<u32>(),
    )
        .prop_map(|(r, b, update, weight, loss, hit, ms)| {
            ClientMessage::Update(ClientUpdate {
                round: RoundId(r),
                base_version: ModelVersion(b),
                update,
                weight,
                metrics: LocalMetrics { loss, hit_rate_at_10: hit, train_ms: ms, norm_within_clip: None },
            })
        });
    let withdraw = (any::<u64>(), 0u8..3).prop_map(|(r, k)| ClientMessage::Withdraw {
        round: RoundId(r),
        reason: match k {
            0 => WithdrawReason::ConditionsChanged,
            1 => WithdrawReason::ConsentWithdrawn,
            _ => WithdrawReason::TrainingFailed,
        },
    });
    let keys =
        (any::<u64>(), any::<[u8; 32]>(), any::<[u8; 32]>(), any::<[u8; 32]>()).prop_map(|(r, c, m, b)| {
            ClientMessage::SecAgg(SecAggClientMessage::KeyAdvert(KeyAdvert {
                round: RoundId(r),
                cipher_pk: c,
                mask_pk: m,
                self_mask_commitment: b,
            }))
        });
    let shares = (
        any::<u64>(),
        prop::collection::vec((any::<u64>(), prop::collection::vec(any::<u8>(), 0..120)), 0..6),
    )
        .prop_map(|(r, v)| {
            ClientMessage::SecAgg(SecAggClientMessage::Shares(ShareBundle {
                round: RoundId(r),
                shares: v
                    .into_iter()
                    .map(|(to, ciphertext)| EncryptedShare { to: ClientId(to), ciphertext })
                    .collect(),
            }))
        });
    let masked =
        (any::<u64>(), any::<u64>(), prop::collection::vec(any::<u32>(), 0..300)).prop_map(|(r, b, v)| {
            ClientMessage::SecAgg(SecAggClientMessage::Masked(MaskedInput {
                round: RoundId(r),
                base_version: ModelVersion(b),
                masked: v,
            }))
        });
    let unmask = (any::<u64>(), prop::collection::vec((any::<u64>(), any::<u8>(), any::<[u8; 32]>()), 0..5))
        .prop_map(|(r, v)| {
            let shares: Vec<RevealedShare> = v
                .into_iter()
                .map(|(of, x, y)| RevealedShare { of: ClientId(of), share: Share { x, y } })
                .collect();
            ClientMessage::SecAgg(SecAggClientMessage::Unmask(UnmaskResponse {
                round: RoundId(r),
                self_mask_shares: shares.clone(),
                mask_key_shares: shares,
            }))
        });
    let evaluation = (any::<u64>(), any::<u64>(), any::<u32>(), -1e6f32..1e6, -1e6f32..1e6, -1e6f32..1e6)
        .prop_map(|(r, v, cases, h, n, l)| {
            ClientMessage::Evaluation(EvalReport {
                round: RoundId(r),
                base_version: ModelVersion(v),
                metrics: EvalMetrics { cases, hits_at_10: h, ndcg_at_10: n, loss: l },
            })
        });
    prop_oneof![check_in, update, withdraw, keys, shares, masked, unmask, evaluation]
}

fn coordinator_message() -> impl Strategy<Value = CoordinatorMessage> {
    let task = (any::<u64>(), any::<u64>(), payload(), plan(), any::<u64>(), any::<bool>()).prop_map(
        |(r, v, model, plan, ms, eval)| {
            CoordinatorMessage::Task(Task {
                round: RoundId(r),
                model_version: ModelVersion(v),
                model,
                plan,
                report_within_ms: ms,
                secure: None,
                kind: if eval { TaskKind::Evaluate } else { TaskKind::Train },
            })
        },
    );
    prop_oneof![
        task,
        (any::<u64>(), any::<u64>())
            .prop_map(|(a, w)| CoordinatorMessage::ComeBackAt(ComeBackAt { after_ms: a, window_ms: w })),
        refusal().prop_map(CoordinatorMessage::Refusal),
        any::<u64>().prop_map(|r| CoordinatorMessage::Receipt { round: RoundId(r) }),
        (any::<u64>(), reject_reason())
            .prop_map(|(r, reason)| CoordinatorMessage::Rejection { round: RoundId(r), reason }),
        (any::<u64>(), prop::collection::vec(any::<u64>(), 0..8), prop::collection::vec(any::<u64>(), 0..8))
            .prop_map(|(r, s, d)| CoordinatorMessage::SecAgg(SecAggServerMessage::UnmaskRequest(
                UnmaskRequest {
                    round: RoundId(r),
                    survivors: s.into_iter().map(ClientId).collect(),
                    dropped: d.into_iter().map(ClientId).collect(),
                }
            ))),
        (any::<u64>(), 0u8..3).prop_map(|(r, k)| CoordinatorMessage::Abort {
            round: RoundId(r),
            reason: match k {
                0 => AbortReason::RoundFull,
                1 => AbortReason::RoundFailed,
                _ => AbortReason::ShuttingDown,
            },
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn client_messages_round_trip(msg in client_message()) {
        let c = Codec::default();
        let bytes = c.encode_client(&msg).unwrap();
        let (back, used) = c.decode_client(&bytes).unwrap();
        prop_assert_eq!(used, bytes.len());
        prop_assert_eq!(back, Inbound::Message { version: PROTOCOL_VERSION, message: msg });
    }

    #[test]
    fn coordinator_messages_round_trip(msg in coordinator_message()) {
        let c = Codec::default();
        let bytes = c.encode_coordinator(&msg).unwrap();
        let (back, used) = c.decode_coordinator(&bytes).unwrap();
        prop_assert_eq!(used, bytes.len());
        prop_assert_eq!(back, Inbound::Message { version: PROTOCOL_VERSION, message: msg });
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_decoder(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let c = Codec::new(4096);
        let _ = c.decode_client(&bytes);
        let _ = c.decode_coordinator(&bytes);
        let mut fb = FrameBuffer::new(c);
        fb.push(&bytes);
        while let Ok(Some(_)) = fb.next_client() {}
    }

    #[test]
    fn mutated_frames_never_panic_and_errors_are_typed(msg in client_message(), pos in any::<usize>(), byte in any::<u8>()) {
        let c = Codec::default();
        let mut bytes = c.encode_client(&msg).unwrap();
        let i = pos % bytes.len();
        bytes[i] = byte;
        if let Ok((Inbound::Message { message: ClientMessage::Update(u), .. }, _)) = c.decode_client(&bytes) {
            // Whatever decoded, validation must stay total.
            let s = u.update.declared_shape();
            let _ = u.update.decode(s, 1 << 20);
        }
    }

    #[test]
    fn encodings_decode_back_to_the_update(u in any_update(), seed in any::<u64>()) {
        let s = u.shape();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        for kind in [EncodingKind::Dense, EncodingKind::RowSparse] {
            let d = EncodedUpdate::encode(&u, kind, &mut rng).decode(s, usize::MAX).unwrap();
            prop_assert_eq!(d.to_dense(), u.to_dense());
        }
        let q = EncodedUpdate::encode(&u, EncodingKind::Quantized8, &mut rng).decode(s, usize::MAX).unwrap().to_dense();
        let dense = u.to_dense();
        for (row_q, row_u) in q.chunks(s.row_len as usize).zip(dense.chunks(s.row_len as usize)) {
            let step = row_u.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
            for (a, b) in row_q.iter().zip(row_u) {
                prop_assert!((a - b).abs() <= step * 1.0001 + 1e-6, "{} vs {} (step {})", a, b, step);
            }
        }
    }

    #[test]
    fn streaming_fedavg_matches_naive_weighted_mean(
        (s, ups) in shape().prop_flat_map(|s| (Just(s), prop::collection::vec((update_for(s), 0.1f64..100.0), 1..12)))
    ) {
        let mut agg = AggregationRule::WeightedMean.aggregator(s);
        let mut naive = vec![0.0f64; s.len()];
        let mut total = 0.0;
        for (u, w) in &ups {
            for (n, v) in naive.iter_mut().zip(u.to_dense()) {
                *n += w * f64::from(v);
            }
            total += w;
            agg.accept(u.clone(), *w).unwrap();
        }
        let out = agg.finish(&mut rand_chacha::ChaCha8Rng::seed_from_u64(0)).unwrap();
        prop_assert_eq!(out.contributors, ups.len());
        for (a, n) in out.delta.iter().zip(&naive) {
            let want = (n / total) as f32;
            prop_assert!((a - want).abs() <= 1e-3 * want.abs().max(1.0), "{} vs {}", a, want);
        }
    }
}
