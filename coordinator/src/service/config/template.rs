//! The commented configuration file `starling init` writes.

/// The commented configuration `starling init` writes (paths relative to the file).
pub const TEMPLATE: &str = r#"# Starling coordinator configuration.
# Every key can be overridden by an environment variable STARLING_<SECTION>_<KEY>,
# e.g. STARLING_SERVER_LISTEN=0.0.0.0:4433 or STARLING_ROUND_TARGET_PARTICIPANTS=200.
# Relative paths are resolved against the directory of this file.
# Reference: docs/operations.md.

[server]
# UDP address of the QUIC endpoint (ALPN "starling/1", TLS 1.3).
listen = "127.0.0.1:4433"
# TCP address of the admin HTTP endpoint: GET /status (JSON) and GET /metrics (Prometheus),
# both require "Authorization: Bearer <admin token>". Keep it on a private interface.
admin_listen = "127.0.0.1:9464"
# Server certificate chain (leaf first) and its PKCS#8 private key, PEM.
cert = "tls/server.pem"
key = "tls/server.key"
# Bearer token of the admin endpoint, and the secret enrollment tokens are signed with.
admin_token_file = "secrets/admin.token"
admin_tls = false                # true: the admin endpoint speaks TLS 1.3 with cert/key (starling admin --ca tls/ca.pem)
token_secret_file = "secrets/token.key"
# Limits. A round start is a burst of handshakes: they are paced by max_concurrent_handshakes
# and absorbed by a large UDP receive buffer (the kernel caps it at net.core.rmem_max).
# Hostile peers: see docs/operations.md ("Limits") for what each costs and the memory bound.
max_connections = 20000
max_connections_per_ip = 64      # carrier NAT puts many devices behind one address: raise if needed
max_concurrent_handshakes = 256
handshake_timeout_ms = 10000          # a slow mobile network may need several seconds
retry_above_handshakes = 32      # stateless QUIC Retry (address validation) beyond this; 0 = always
checkin_timeout_ms = 5000        # open a stream, then check in with a valid token, each within this
max_frame_bytes = 67108864       # selected clients' uploads (capped further at the model's size)
unauthenticated_max_frame_bytes = 16384
frame_timeout_ms = 30000         # a frame must finish arriving within this
send_timeout_ms = 10000          # a frame must be written within this (a peer that stops reading)
idle_timeout_ms = 30000
max_concurrent_streams = 2
rate_per_second = 10
rate_burst = 20
recv_buffer_bytes = 4194304

[model]
family = "bpr-mf"    # "bpr-mf" or "two-tower" (their own shape and initialisation); other names: a rows x row_len matrix
rows = 1682          # items (two-tower adds its dense rows after the item rows)
row_len = 32         # embedding dimension
init_std = 0.01
seed = 1
history = 4          # earlier versions kept to serve patches instead of full models

[round]
target_participants = 100
min_reports = 50
over_selection = 1.3
selection_pool = 0           # 0: wait for selection_timeout_ms, then sample
selection_timeout_ms = 60000
report_timeout_ms = 300000
interval_ms = 1000
max_rounds = 0               # 0: run until stopped (or the privacy budget is spent)
require_charging = true
require_unmetered = true
require_idle = true
min_battery_percent = 0
epochs = 1
learning_rate = 0.05
private_learning_rate = 0.05
batch_size = 32
encoding = "row_sparse"      # row_sparse | dense | quantized8
# A client's aggregation weight: auto = equal weights under any DP mode, else the example count it
# reports capped at max_weight (larger claims are clamped); equal; examples (capped).
weighting = "auto"
max_weight = 100.0
retry_after_ms = 600000
retry_window_ms = 300000

[strategy]
kind = "fedavg"              # fedavg | fedavg_row | fedavgm | fedadam | fedyogi | median | trimmed_mean
server_learning_rate = 1.0
momentum = 0.9
trim = 0.1

[privacy]
# central: clients clip, the coordinator Poisson-samples devices, sums clipped updates, adds
#          Gaussian noise and keeps the ledger (it sees individual clipped updates in memory).
# local:   every device clips and noises its own update (trusts nobody; costs far more accuracy).
# off:     no noise at all: models carry no privacy guarantee.
mode = "central"
clip_norm = 1.0              # clients clip to this L2 norm and the coordinator re-clips, in every mode
noise_multiplier = 1.0       # sigma: noise standard deviation over the clip norm
# Central DP samples every checked-in device with probability q = min(1, target_participants / N),
# N = enrolled devices with a live token (`starling token issue`), and charges each round at that q.
# The budget therefore lasts only with a large enough fleet. With target_participants = 100,
# sigma = 1 and delta = 1e-7, the PLD accountant gives (`starling privacy epsilon` plans others):
#   N =     1,000 (q = 0.1):    epsilon 9.0 after 100 rounds: the budget of 8 lasts under 100 rounds
#   N =    10,000 (q = 0.01):   epsilon 2.4 after 1,000 rounds, 7.6 after 10,000
#   N =   100,000 (q = 0.001):  epsilon 0.23 after 1,000 rounds, 0.63 after 10,000
#   N = 1,000,000 (q = 0.0001): epsilon 0.02 after 1,000 rounds, 0.06 after 10,000
# With fewer enrolled devices than the target, q = 1: each round costs about 5.6.
epsilon_budget = 8.0         # rounds that would exceed it are not started
delta = 1e-7                 # must be well below 1/N: rounds are refused when delta * N > 0.1
noise_sampler = "opendp-grid" # opendp-grid | opendp-exact: discrete Gaussians, OS-seeded
adaptive_clipping = false    # true: clip_norm follows the target_quantile of update norms
target_quantile = 0.5
clip_learning_rate = 0.2
clip_count_noise = 0.0       # noise on the count of clipping bits; 0 = target_participants / 20
allow_release_without_dp = false # mode = "off" on a store with DP rounds is refused unless true

[secure_aggregation]
# SecAgg+ (Bell et al. 2020): devices mask their updates so that the coordinator learns only the
# sum of a round's surviving devices. With privacy.mode = "central" the devices also add the DP
# noise (distributed discrete Gaussian): nobody, not even this coordinator, sees a noiseless sum.
# See docs/protocol.md (message flow, threat model) and docs/privacy.md (distributed DP).
enabled = false
neighbours = 32              # k: each device exchanges keys and shares with k others (even)
threshold = 0                # t of k shares reconstruct a device's secrets; 0 = k/2 + 1
bits = 32                    # sums are computed mod 2^bits
dropout_tolerance = 0.3      # rounds keep the full noise if at most this fraction drops out; fewer survivors abort
max_cohort = 10000           # largest round; the modulus is sized so that it can never overflow
rotation = false             # randomised Hadamard rotation before quantisation
phase_timeout_ms = 30000     # each protocol phase but the masked input (that one has report_timeout_ms)

[evaluation]
# Federated evaluation: devices score the current model on their own held-out latest positive and
# send only sums (HR@10, NDCG@10, loss); under central DP the sums are noised and the round is
# charged to the privacy budget like a training round. Not supported under secure aggregation or
# local DP (every_rounds must then stay unset or 0).
# every_rounds = 5           # an evaluation round after every N committed training rounds; 0 = off
target_participants = 0      # reports an evaluation round aims for; 0 = round.target_participants

[storage]
path = "data/coordinator.db" # SQLite (WAL, synchronous=FULL); back it up with `sqlite3 .backup`
keep_checkpoints = 8
# PostgreSQL instead of the SQLite file (path is then not used); no TLS: a private network or a
# local socket. Durable with synchronous_commit = on (the default). See docs/operations.md.
# postgres = "host=10.0.0.5 port=5432 user=starling dbname=starling"
# postgres_password_file = "secrets/postgres-password"   # read at start-up, trimmed, never logged

[cluster]
# Several `starling serve` nodes serving one population on one PostgreSQL (storage.postgres):
# every node serves devices, one leader (a lease in the database) runs the schedule, combines the
# nodes' partial aggregates and commits. See docs/operations.md, "Several nodes".
enabled = false
# node = "coord-a"           # unique per node; default: host name and QUIC port
population = "default"
# advertise = "quic.example.org:4433"   # how devices reach this node; default: the bound address
lease_ttl_ms = 3000
lease_margin_ms = 1000
heartbeat_ms = 1000
tick_ms = 200
share_grace_ms = 2000
db_timeout_ms = 2000
"#;
