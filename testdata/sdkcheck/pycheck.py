"""Drives azsim with Microsoft's official Python device SDK (azure-iot-device
2.14.0), unchanged: registers through DPS with a symmetric-key enrollment
group (the SDK's SAS token carries no skn), connects to the assigned hub,
sends telemetry, reads the twin, reports a property and handles a direct
method and C2D. Then it waits while sdkcheck.sh restarts azsim: the SDK
reconnects by itself with CleanSession=0 and never subscribes again, so
twin answers, methods and C2D after the restart prove that azsim kept the
session. Prints one JSON line with the outcome; exits non-zero on error.

usage: python3 pycheck.py DPS_HOST HUB_NAME ID_SCOPE REG_ID DEVICE_KEY_B64 TRUST_PEM STATE_DIR

The SDK always dials port 8883 (443 over WebSockets), so azsim serves DPS and
the hub on 8883 at two loopback addresses. STATE_DIR is where the script and
sdkcheck.sh signal each other: it writes ready and reconnected, and waits for
restarted.
"""
import json
import logging
import os
import sys
import threading
import time

from azure.iot.device import IoTHubDeviceClient, Message, MethodResponse, ProvisioningDeviceClient

dps_host, hub_name, id_scope, reg_id, device_key, trust_pem, state = sys.argv[1:8]
trust = open(trust_pem).read()
events = []  # what arrived, in order: ("c2d", body) / ("method", name)
arrived = threading.Condition()
subscribes = []  # SUBSCRIBE packets the SDK sent, from paho's own log


class PahoLog(logging.Handler):
    """Counts the SUBSCRIBEs paho sends (the SDK hands paho this logger)."""

    def emit(self, record):
        if "Sending SUBSCRIBE" in record.getMessage():
            subscribes.append(time.time())


paho_log = logging.getLogger("paho")
paho_log.setLevel(logging.DEBUG)
paho_log.addHandler(PahoLog())


def done(ok, **kw):
    print(json.dumps(dict(ok=ok, **kw)), flush=True)
    sys.exit(0 if ok else 1)


def signal(name):
    with open(os.path.join(state, name), "w") as f:
        f.write("1")


def wait_for(pred, what, timeout=60):
    deadline = time.time() + timeout
    while not pred():
        if time.time() > deadline:
            done(False, step=what, error="timed out after %ds" % timeout, events=events)
        time.sleep(0.2)


def wait_event(kind, value, timeout=60):
    with arrived:
        if not arrived.wait_for(lambda: (kind, value) in events, timeout):
            done(False, step="%s %s" % (kind, value), error="not received", events=events)


try:
    prov = ProvisioningDeviceClient.create_from_symmetric_key(
        provisioning_host=dps_host, registration_id=reg_id, id_scope=id_scope,
        symmetric_key=device_key, server_verification_cert=trust)
    reg = prov.register()
except Exception as e:  # noqa: BLE001 - any failure is the outcome
    done(False, step="register", error=repr(e))
if reg.status != "assigned":
    done(False, step="register", error="status " + str(reg.status))
assigned = reg.registration_state.assigned_hub
if assigned != hub_name:
    done(False, step="register", error="assigned hub %r, expected %r" % (assigned, hub_name))

client = IoTHubDeviceClient.create_from_symmetric_key(
    symmetric_key=device_key, hostname=assigned, device_id=reg.registration_state.device_id,
    server_verification_cert=trust, connection_retry_interval=1)


def on_message(msg):
    with arrived:
        events.append(("c2d", msg.data.decode()))
        arrived.notify_all()


def on_method(req):
    client.send_method_response(MethodResponse.create_from_method_request(req, 200, {"pong": req.payload}))
    with arrived:
        events.append(("method", req.name))
        arrived.notify_all()


try:
    client.connect()
    # Setting a handler subscribes: C2D, methods (twin responses at the
    # first get_twin).
    client.on_message_received = on_message
    client.on_method_request_received = on_method
    client.send_message(Message(json.dumps({"sdk": "python"}), content_encoding="utf-8", content_type="application/json"))
    twin = client.get_twin()
    client.patch_twin_reported_properties({"pycheck": "before-restart"})
except Exception as e:  # noqa: BLE001
    done(False, step="hub", error=repr(e))
if "desired" not in twin:
    done(False, step="twin", error="no desired section: %r" % twin)

before = len(subscribes)
if before == 0:
    done(False, step="paho log", error="no SUBSCRIBE seen in paho's log: the resubscribe check would prove nothing")
signal("ready")
# sdkcheck.sh invokes a method and sends C2D now, then restarts azsim.
wait_event("method", "before")
wait_event("c2d", "c2d-before")
wait_for(lambda: os.path.exists(os.path.join(state, "restarted")), "azsim restart", 120)
wait_for(lambda: client.connected, "reconnect after the restart", 60)
try:
    twin = client.get_twin()
    client.patch_twin_reported_properties({"pycheck": "after-restart"})
    client.send_message(Message("after restart"))
except Exception as e:  # noqa: BLE001
    done(False, step="twin after the restart", error=repr(e))
signal("reconnected")
wait_event("c2d", "c2d-queued-while-down")
wait_event("method", "after")
wait_event("c2d", "c2d-after")
client.shutdown()
if len(subscribes) != before:
    done(False, step="resubscribe", error="the SDK subscribed again after the restart; the check proves nothing")
done(True, device=reg.registration_state.device_id, hub=assigned, desired=twin.get("desired"), events=events,
     subscribes=before)
