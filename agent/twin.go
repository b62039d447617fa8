package agent

import (
	"context"
	"encoding/json"
	"time"

	"github.com/gwagent/gwagent/provisioning"
	"github.com/gwagent/gwagent/transport"
)

// onDesired applies a desired-properties patch.
func (a *Agent) onDesired(patch json.RawMessage, version int64) {
	a.applyDesired(patch)
	a.mu.Lock()
	sess := a.sess
	a.mu.Unlock()
	if sess != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		a.reportInterval(ctx, sess, version)
	}
}

func (a *Agent) applyDesired(desired json.RawMessage) {
	var d struct {
		TelemetryInterval *float64 `json:"telemetryInterval"`
	}
	if json.Unmarshal(desired, &d) != nil || d.TelemetryInterval == nil {
		return
	}
	iv := time.Duration(*d.TelemetryInterval * float64(time.Second))
	if iv < time.Second {
		a.log.Warn("ignoring desired telemetryInterval below 1 s", "seconds", *d.TelemetryInterval)
		return
	}
	if old := a.setInterval(iv); old != iv {
		a.log.Info("telemetry interval changed by the twin", "from", old, "to", iv)
	}
}

func (a *Agent) reportInterval(ctx context.Context, sess *transport.Session, version int64) {
	patch := map[string]any{"telemetryInterval": map[string]any{
		"value": time.Duration(a.interval.Load()).Seconds(), "ac": 200, "av": version, "ad": "applied",
	}}
	if _, err := sess.PatchReported(ctx, patch); err != nil {
		a.log.Warn("twin report failed", "err", err)
	}
}

// syncTwin reads the desired properties (notifications are not replayed
// across reconnects) and reports the agent's version, state and
// certificate validity.
func (a *Agent) syncTwin(ctx context.Context, sess *transport.Session, id *provisioning.Identity) {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	var version int64
	if tw, err := sess.GetTwin(ctx); err != nil {
		a.log.Warn("twin read failed", "err", err)
	} else {
		a.applyDesired(tw.Desired)
		var v struct {
			Version int64 `json:"$version"`
		}
		json.Unmarshal(tw.Desired, &v)
		version = v.Version
	}
	report := map[string]any{
		"agent": map[string]any{"version": a.opts.Version, "state": a.status.Snapshot().State, "startedAt": a.started.UTC()},
		"certificate": map[string]any{
			"validFrom": id.NotBefore.UTC().Format(time.RFC3339), "validUntil": id.NotAfter.UTC().Format(time.RFC3339),
			"serial": id.Serial, "via": id.Via,
		},
	}
	if _, err := sess.PatchReported(ctx, report); err != nil {
		a.log.Warn("twin report failed", "err", err)
		return
	}
	a.reportInterval(ctx, sess, version)
}

// onMethod answers direct methods.
func (a *Agent) onMethod(name string, payload []byte) (int, []byte) {
	a.log.Info("direct method", "name", name)
	switch name {
	case "ping":
		b, _ := json.Marshal(map[string]any{"pong": true, "time": a.opts.Now().UTC(), "version": a.opts.Version, "state": a.status.Snapshot().State})
		return 200, b
	case "renewCertificate":
		a.RequestRenewal("renewCertificate direct method")
		return 202, []byte(`{"accepted":true,"message":"renewal started; watch the twin's reported certificate"}`)
	}
	return 404, []byte(`{"error":"unknown method"}`)
}
