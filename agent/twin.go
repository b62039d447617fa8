package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"time"

	"github.com/gwagent/gwagent/provisioning"
	"github.com/gwagent/gwagent/transport"
)

// twinRequestTimeout bounds each twin request on its own (Options.TwinTimeout):
// a slow read must not eat the budget of the report after it.
const twinRequestTimeout = 30 * time.Second

// onDesired applies a desired-properties patch.
func (a *Agent) onDesired(patch json.RawMessage, version int64) {
	if !a.calls.enter() {
		return
	}
	defer a.calls.leave()
	a.applyDesired(patch)
	a.mu.Lock()
	sess := a.sess
	a.mu.Unlock()
	if sess != nil {
		if err := a.reportInterval(a.callbackCtx(), sess, version); err != nil {
			a.log.Warn("twin report failed", "err", err)
		}
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

func (a *Agent) reportInterval(ctx context.Context, sess *transport.Session, version int64) error {
	patch := map[string]any{"telemetryInterval": map[string]any{
		"value": time.Duration(a.interval.Load()).Seconds(), "ac": 200, "av": version, "ad": "applied",
	}}
	return a.twinRequest(ctx, "report of telemetryInterval (PATCH reported)", func(ctx context.Context) error {
		_, err := sess.PatchReported(ctx, patch)
		return err
	})
}

// syncTwin reads the desired properties (notifications are not replayed
// across reconnects) and reports the agent's version, state and
// certificate validity. A failed sync is retried with backoff (the hub's
// retry-after if it sent one) until it succeeds or the session ends.
func (a *Agent) syncTwin(ctx context.Context, sess *transport.Session, id *provisioning.Identity) {
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 0x7769))
	var done twinSyncDone
	for attempt := 1; ; attempt++ {
		err := a.syncTwinOnce(ctx, sess, id, &done)
		if err == nil {
			if attempt > 1 {
				a.log.Info("twin synchronised", "attempts", attempt)
			}
			a.status.Clear(CondThrottled)
			return
		}
		if ctx.Err() != nil {
			return
		}
		d := a.opts.Backoff.Delay(attempt, rng)
		var se *transport.StatusError
		if errors.As(err, &se) && se.RetryAfter > d {
			d = se.RetryAfter
		}
		if errors.As(err, &se) && se.Status == 429 {
			a.status.Raise(CondThrottled, fmt.Sprintf("the hub throttled a twin operation (429); retrying in %s", d.Round(time.Millisecond)))
		}
		a.log.Warn("twin synchronisation failed; retrying", "err", err, "retry_in", d.Round(time.Millisecond))
		t := time.NewTimer(d)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
	}
}

// twinSyncDone is what a sync has achieved so far: a retry after a throttled
// (429) step goes on from there instead of repeating the steps that worked,
// which under a hub-wide rate limit would be throttled in turn, forever.
type twinSyncDone struct {
	read, reported bool
	version        int64
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
		a.applyDesired(tw.Desired)
		var v struct {
			Version int64 `json:"$version"`
		}
		json.Unmarshal(tw.Desired, &v)
		done.read, done.version = true, v.Version
	}
	if done.reported {
		return a.reportInterval(ctx, sess, done.version)
	}
	report := map[string]any{
		"agent": map[string]any{"version": a.opts.Version, "state": a.status.Snapshot().State, "startedAt": a.started.UTC()},
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
	return a.reportInterval(ctx, sess, done.version)
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
		b, _ := json.Marshal(map[string]any{"pong": true, "time": a.opts.Now().UTC(), "version": a.opts.Version, "state": a.status.Snapshot().State})
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
