package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/gwagent/gwagent/internal/retry"
	"github.com/gwagent/gwagent/provisioning"
	"github.com/gwagent/gwagent/transport"
)

// twinRequestTimeout bounds each twin request on its own (Options.TwinTimeout):
// a slow read must not eat the budget of the report after it.
const twinRequestTimeout = 30 * time.Second

// desiredState orders desired-properties updates. The MQTT client runs
// each message's callback on a goroutine of its own (so a callback waiting
// for a twin answer blocks neither that answer nor other messages), which
// means two updates in quick succession, or an update and the sync's full
// read, may be applied in either order: an older one must not undo a newer.
type desiredState struct {
	mu       sync.Mutex
	latest   int64 // newest desired version seen (reported as "av")
	interval int64 // version of the telemetryInterval in effect
}

// onDesired applies a desired-properties patch and reports the result. It
// runs on the MQTT client's goroutine for this message (tracked by calls,
// under the agent's context); blocking here on the twin answer is fine.
func (a *Agent) onDesired(patch json.RawMessage, version int64) {
	if !a.calls.enter() {
		return
	}
	defer a.calls.leave()
	if !a.applyDesired(patch, version) {
		return // a newer version is in effect and was reported
	}
	a.mu.Lock()
	sess := a.sess
	a.mu.Unlock()
	if sess != nil {
		if err := a.reportInterval(a.callbackCtx(), sess); err != nil {
			a.log.Warn("twin report failed", "err", err)
			return
		}
		a.log.Debug("desired properties applied and reported", "version", version)
	}
}

// applyDesired applies desired properties of the given version (a patch
// or the whole document); false if they are older than what is in effect.
func (a *Agent) applyDesired(desired json.RawMessage, version int64) bool {
	var d struct {
		TelemetryInterval *float64 `json:"telemetryInterval"`
	}
	json.Unmarshal(desired, &d)
	a.desired.mu.Lock()
	defer a.desired.mu.Unlock()
	if d.TelemetryInterval != nil && version > 0 && version < a.desired.interval {
		a.log.Debug("ignoring desired properties older than those in effect", "version", version, "in_effect", a.desired.interval)
		return false
	}
	a.desired.latest = max(a.desired.latest, version)
	if d.TelemetryInterval == nil {
		return true
	}
	a.desired.interval = version
	iv := time.Duration(*d.TelemetryInterval * float64(time.Second))
	if iv < time.Second {
		a.log.Warn("ignoring desired telemetryInterval below 1 s", "seconds", *d.TelemetryInterval)
		return true
	}
	if old := a.health.SetInterval(iv); old != iv {
		a.log.Info("telemetry interval changed by the twin", "from", old, "to", iv, "version", version)
	}
	return true
}

// twinRequest runs one twin request under its own deadline and names it in
// its error.
func (a *Agent) twinRequest(ctx context.Context, what string, f func(context.Context) error) error {
	ctx, cancel := context.WithTimeout(ctx, a.opts.TwinTimeout)
	defer cancel()
	if err := f(ctx); err != nil {
		return fmt.Errorf("twin %s: %w", what, err)
	}
	return nil
}

// reportInterval reports the interval in effect and the newest desired
// version seen.
func (a *Agent) reportInterval(ctx context.Context, sess *transport.Session) error {
	a.desired.mu.Lock()
	version := a.desired.latest
	a.desired.mu.Unlock()
	patch := map[string]any{"telemetryInterval": map[string]any{
		"value": a.health.Interval().Seconds(), "ac": 200, "av": version, "ad": "applied",
	}}
	return a.twinRequest(ctx, "report of telemetryInterval (PATCH reported)", func(ctx context.Context) error {
		_, err := sess.PatchReported(ctx, patch)
		return err
	})
}

// syncTwin reads the desired properties (notifications are not replayed
// across reconnects) and reports the agent's version, state and
// certificate validity. A failed sync is retried (retry.Loop: the backoff,
// or the hub's retry-after if longer) until it succeeds or the session
// ends.
func (a *Agent) syncTwin(ctx context.Context, sess *transport.Session, id *provisioning.Identity) {
	// Versions are per device identity, which may have changed (another
	// hub or device id after re-provisioning): start afresh.
	a.desired.mu.Lock()
	a.desired.latest, a.desired.interval = 0, 0
	a.desired.mu.Unlock()
	var done twinSyncDone
	attempts := 1
	err := retry.Loop{Policy: a.opts.Backoff, Clock: a.clock,
		Rand: rand.New(rand.NewPCG(uint64(a.clock.Now().UnixNano()), 0x7769)),
		OnRetry: func(err error, failures int, d time.Duration) {
			attempts = failures + 1
			var se *transport.StatusError
			if errors.As(err, &se) && se.Status == 429 {
				a.status.Raise(CondThrottled, fmt.Sprintf("the hub throttled a twin operation (429); retrying in %s", d.Round(time.Millisecond)))
			}
			a.log.Warn("twin synchronisation failed; retrying", "err", err, "retry_in", d.Round(time.Millisecond))
		},
	}.Do(ctx, func(ctx context.Context) error { return a.syncTwinOnce(ctx, sess, id, &done) })
	if err != nil {
		return // the session ended
	}
	if attempts > 1 {
		a.log.Info("twin synchronised", "attempts", attempts)
	} else {
		a.log.Debug("twin synchronised")
	}
	a.status.Clear(CondThrottled)
}

// twinSyncDone is what a sync has achieved so far: a retry after a throttled
// (429) step goes on from there instead of repeating the steps that worked,
// which under a hub-wide rate limit would be throttled in turn, forever.
type twinSyncDone struct {
	read, reported bool
}

func (a *Agent) syncTwinOnce(ctx context.Context, sess *transport.Session, id *provisioning.Identity, done *twinSyncDone) error {
	if !done.read {
		var tw *transport.Twin
		err := a.twinRequest(ctx, "read (GET)", func(ctx context.Context) (err error) {
			tw, err = sess.GetTwin(ctx)
			return err
		})
		if err != nil {
			return err
		}
		var v struct {
			Version int64 `json:"$version"`
		}
		json.Unmarshal(tw.Desired, &v)
		a.applyDesired(tw.Desired, v.Version)
		done.read = true
	}
	if done.reported {
		return a.reportInterval(ctx, sess)
	}
	report := map[string]any{
		"agent": map[string]any{"version": a.opts.Version, "state": a.status.Snapshot().State, "startedAt": a.status.Started().UTC()},
		"certificate": map[string]any{
			"validFrom": id.NotBefore.UTC().Format(time.RFC3339), "validUntil": id.NotAfter.UTC().Format(time.RFC3339),
			"serial": id.Serial, "via": id.Via,
		},
	}
	err := a.twinRequest(ctx, "report of agent and certificate (PATCH reported)", func(ctx context.Context) error {
		_, err := sess.PatchReported(ctx, report)
		return err
	})
	if err != nil {
		return err
	}
	done.reported = true
	return a.reportInterval(ctx, sess)
}

// onMethod answers direct methods.
func (a *Agent) onMethod(name string, payload []byte) (int, []byte) {
	if !a.calls.enter() {
		return 503, []byte(`{"error":"the agent is stopping"}`)
	}
	defer a.calls.leave()
	a.log.Info("direct method", "name", name)
	switch name {
	case "ping":
		b, _ := json.Marshal(map[string]any{"pong": true, "time": a.clock.Now().UTC(), "version": a.opts.Version, "state": a.status.Snapshot().State})
		return 200, b
	case "renewCertificate":
		if a.cfg.Load().Static() {
			return 409, []byte(`{"accepted":false,"message":"static mode: the factory certificate is not renewed by gwagent"}`)
		}
		a.RequestRenewal("renewCertificate direct method")
		return 202, []byte(`{"accepted":true,"message":"renewal started; watch the twin's reported certificate"}`)
	}
	return 404, []byte(`{"error":"unknown method"}`)
}
