#!/bin/sh
# The chaos of tests/integration/test_record_cluster.py, run by `multisniff record -- ./chaos.sh`
# while the clients send: delete a server pod and create it again, restart the container of the
# other one, and mark each step on the recording's timeline. Exits with $CHAOS_EXIT (0).
# Needs KUBECTL, KUBECONFIG, NS, PORT, SERVER_MANIFEST and MULTISNIFF (how to run multisniff).
set -eu
k() { "$KUBECTL" --kubeconfig "$KUBECONFIG" -n "$NS" "$@"; }

sleep 3  # the clients' steady traffic first
$MULTISNIFF mark "chaos: deleting server-a"
k delete pod server-a --wait=true --timeout=60s >/dev/null
k apply -f "$SERVER_MANIFEST" >/dev/null
k wait --for=condition=Ready pod/server-a --timeout=60s >/dev/null
new_ip=$(k get pod server-a -o jsonpath='{.status.podIP}')
$MULTISNIFF mark "chaos: server-a is back at $new_ip"
# Ten seconds of datagrams: the new pod's capture starts while they come.
k exec client -- workload udp -targets "$new_ip:$PORT" -count 200 -rate 20 -pod client \
    -report 0 >/dev/null

$MULTISNIFF mark "chaos: restarting server-b"
k exec server-b -- kill -TERM 1 || true  # the exec may die with the container it ends
i=0
until [ "$(k get pod server-b -o jsonpath='{.status.containerStatuses[0].restartCount}')" = 1 ] &&
      [ "$(k get pod server-b -o jsonpath='{.status.containerStatuses[0].ready}')" = true ]; do
    i=$((i + 1)); [ $i -lt 120 ] || { echo "server-b did not restart" >&2; exit 99; }
    sleep 0.5
done
sleep 3
$MULTISNIFF mark "chaos: done"
exit "${CHAOS_EXIT:-0}"
