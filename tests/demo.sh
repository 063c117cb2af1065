#!/usr/bin/env bash
# The whole pipeline on this machine: cloud-ingest (embedded log) + edge-agent + simulated
# sensors publishing over real MQTT; then shows the records in the log.
# Uses config/agent.yaml and config/cloud-ingest.yaml as they are (ports 1883, 1884, 8080, 9464;
# data in ./demo-data). DURATION=60s RATE=2000 bash tests/demo.sh for a longer, faster run.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10s}
RATE=${RATE:-500}

bash tests/setup.sh build   # C build tools for librdkafka
cargo build --release --workspace --bins --locked
mkdir -p demo-data
export EDGE_AGENT_TOKEN=demo-token-change-me   # its SHA-256 is in config/cloud-ingest.yaml

./target/release/cloud-ingest run --config config/cloud-ingest.yaml > demo-data/ingest.out 2> demo-data/ingest.log &
ingest=$!
./target/release/edge-agent run --config config/agent.yaml > demo-data/agent.out 2> demo-data/agent.log &
agent=$!
trap 'kill -TERM $agent $ingest 2>/dev/null || true; wait 2>/dev/null || true' EXIT

wait_for() { # file, line prefix, process
  for _ in $(seq 1 100); do
    grep -q "^$2" "$1" 2>/dev/null && return 0
    kill -0 "$3" 2>/dev/null || { echo "failed to start; see ${1%.out}.log:"; tail -5 "${1%.out}.log"; exit 1; }
    sleep 0.1
  done
  echo "timed out waiting for '$2' in $1"; exit 1
}
wait_for demo-data/ingest.out "listening on" $ingest
wait_for demo-data/agent.out "mqtt listening on" $agent
echo "== cloud-ingest on http://127.0.0.1:8080, edge-agent MQTT on 127.0.0.1:1883 (3.1.1 and 5; also 1884), agent metrics on http://127.0.0.1:9464/metrics"
echo "== 5 simulated sensors publish $RATE msg/s for $DURATION (QoS 1) on plant/<n>/{alarm,telemetry,logs}/value"
./target/release/loadgen --mqtt 127.0.0.1:1883 --clients 5 --rate "$RATE" --duration "$DURATION" --ingest http://127.0.0.1:8080
echo "== topics in the embedded log (topic, records)"
./target/release/cloud-ingest log topics --config config/cloud-ingest.yaml
echo "== the last 3 records of iot.demo.telemetry"
end=$(./target/release/cloud-ingest log topics --config config/cloud-ingest.yaml | awk '$1=="iot.demo.telemetry" {print $2}')
./target/release/cloud-ingest log read --config config/cloud-ingest.yaml --topic iot.demo.telemetry --from $(( ${end:-3} > 3 ? ${end:-3} - 3 : 0 )) --limit 3
echo "== also: curl -s http://127.0.0.1:8080/v1/log/iot.demo.alarms?from=0\&limit=2 ; logs in demo-data/*.log"
