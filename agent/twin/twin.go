// Package twin is the agent's side of the device twin and of direct
// methods: the twin's synchronisation at the start of every hub session
// (read the desired properties, report the agent, its certificate and the
// telemetry interval in effect), desired-properties updates applied in
// version order, their reports, and the answers to the direct methods
// (ping, renewCertificate).
//
// It is one of the agent's own parts: only agent/ imports it. It talks to
// the agent through Deps (the interval the twin sets, the status it reports
// and raises conditions on, the renewal it may start) and to the hub
// through the Session it is handed; it times its retries on the injected
// clock and logs only through the logger it is handed.
//
// Goroutines: Serve runs on a goroutine of the agent's, one per hub
// session, and is the only one that sends twin requests: the
// synchronisation, then every report. The hub's callbacks (OnDesired,
// OnMethod) run on the MQTT client's goroutines and never block them:
// OnDesired applies the update under a mutex and wakes Serve, which reports
// the newest state once its current request is answered.
package twin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/gwagent/gwagent/agent/status"
	"github.com/gwagent/gwagent/internal/clock"
	"github.com/gwagent/gwagent/internal/condition"
	"github.com/gwagent/gwagent/internal/retry"
	"github.com/gwagent/gwagent/provisioning"
	"github.com/gwagent/gwagent/transport"
)

// RequestTimeout bounds each twin request on its own (Deps.Timeout's
// default): a slow read must not eat the budget of the report after it.
const RequestTimeout = 30 * time.Second

// Session is the hub session's twin API (transport.Session).
type Session interface {
	GetTwin(ctx context.Context) (*transport.Twin, error)
	PatchReported(ctx context.Context, patch any) (int64, error)
}

// Interval is the telemetry interval the twin's desired telemetryInterval
// sets (the agent's health loop).
type Interval interface {
	Interval() time.Duration
	SetInterval(d time.Duration) (old time.Duration)
}

// Status is the agent's status tracker as the twin sees it.
type Status interface {
	condition.Sink
	Snapshot() status.Status
	Started() time.Time
}

// Deps are what the agent hands the twin.
type Deps struct {
	Clock    clock.Clock
	Log      *slog.Logger
	Version  string
	Interval Interval
	Status   Status
	// Backoff paces the synchronisation's retries (the hub's retry-after
	// if longer).
	Backoff retry.Policy
	// Timeout bounds each request; default RequestTimeout.
	Timeout time.Duration
	// Static says the device has a factory certificate, which gwagent
	// does not renew (renewCertificate answers 409).
	Static func() bool
	// RequestRenewal starts a renewal without waiting for it.
	RequestRenewal func(why string)
}

// Twin is one device's twin state across its hub sessions.
type Twin struct {
	d      Deps
	report chan struct{} // wakes Serve: an update wants reporting

	mu       sync.Mutex
	latest   int64 // newest desired version seen (reported as "av")
	interval int64 // version of the telemetryInterval in effect
}

// New prepares the twin.
func New(d Deps) *Twin {
	if d.Timeout == 0 {
		d.Timeout = RequestTimeout
	}
	return &Twin{d: d, report: make(chan struct{}, 1)}
}

// OnDesired takes a desired-properties patch from the hub (on the MQTT
// client's goroutine): it applies it at once, unless a newer version is in
// effect, and has Serve report the result. It never blocks.
//
// The MQTT client runs each message's callback on a goroutine of its own,
// so two updates in quick succession, or an update and the sync's full
// read, may arrive in either order: an older one must not undo a newer.
func (t *Twin) OnDesired(patch json.RawMessage, version int64) {
	if !t.apply(patch, version) {
		return // a newer version is in effect and was reported
	}
	select {
	case t.report <- struct{}{}:
	default: // a report is already due; it will carry this update too
	}
}

// apply applies desired properties of the given version (a patch or the
// whole document); false if they are older than what is in effect.
func (t *Twin) apply(desired json.RawMessage, version int64) bool {
	var d struct {
		TelemetryInterval *float64 `json:"telemetryInterval"`
	}
	json.Unmarshal(desired, &d)
	t.mu.Lock()
	defer t.mu.Unlock()
	if d.TelemetryInterval != nil && version > 0 && version < t.interval {
		t.d.Log.Debug("ignoring desired properties older than those in effect", "version", version, "in_effect", t.interval)
		return false
	}
	t.latest = max(t.latest, version)
	if d.TelemetryInterval == nil {
		return true
	}
	t.interval = version
	iv := time.Duration(*d.TelemetryInterval * float64(time.Second))
	if iv < time.Second {
		t.d.Log.Warn("ignoring desired telemetryInterval below 1 s", "seconds", *d.TelemetryInterval)
		return true
	}
	if old := t.d.Interval.SetInterval(iv); old != iv {
		t.d.Log.Info("telemetry interval changed by the twin", "from", old, "to", iv, "version", version)
	}
	return true
}

// request runs one twin request under its own deadline and names it in
// its error.
func (t *Twin) request(ctx context.Context, what string, f func(context.Context) error) error {
	ctx, cancel := context.WithTimeout(ctx, t.d.Timeout)
	defer cancel()
	if err := f(ctx); err != nil {
		return fmt.Errorf("twin %s: %w", what, err)
	}
	return nil
}

// intervalReport is what a report of the telemetry interval says.
type intervalReport struct {
	value   float64
	version int64
}

// inEffect is the interval in effect and the newest desired version seen.
func (t *Twin) inEffect() intervalReport {
	t.mu.Lock()
	defer t.mu.Unlock()
	return intervalReport{value: t.d.Interval.Interval().Seconds(), version: t.latest}
}

// reportInterval reports r.
func (t *Twin) reportInterval(ctx context.Context, sess Session, r intervalReport) error {
	patch := map[string]any{"telemetryInterval": map[string]any{
		"value": r.value, "ac": 200, "av": r.version, "ad": "applied",
	}}
	return t.request(ctx, "report of telemetryInterval (PATCH reported)", func(ctx context.Context) error {
		_, err := sess.PatchReported(ctx, patch)
		return err
	})
}

// Serve synchronises the twin at the start of a session, then reports
// desired-properties updates as they are applied, one request at a time,
// until ctx ends (the session's end). Updates that arrive while a report
// waits for its answer are reported together in the next; a report that
// fails is retried like the sync, with what is in effect by then.
func (t *Twin) Serve(ctx context.Context, sess Session, id *provisioning.Identity) {
	last, ok := t.sync(ctx, sess, id)
	if !ok {
		return
	}
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.report:
		}
		err := t.retry("twin report failed; retrying").Do(ctx, func(ctx context.Context) error {
			r := t.inEffect()
			if r == last {
				return nil // the sync or the last report said it already
			}
			if err := t.reportInterval(ctx, sess, r); err != nil {
				return err
			}
			last = r
			t.d.Log.Debug("desired properties applied and reported", "version", r.version)
			return nil
		})
		if err != nil {
			return // the session ended
		}
		t.d.Status.Clear(condition.Throttled)
	}
}

// retry is the retry loop of the twin's requests: the backoff, or the
// hub's retry-after if longer; a 429 raises condition.Throttled.
func (t *Twin) retry(msg string) retry.Loop {
	return retry.Loop{Policy: t.d.Backoff, Clock: t.d.Clock,
		Rand: rand.New(rand.NewPCG(uint64(t.d.Clock.Now().UnixNano()), 0x7769)),
		OnRetry: func(err error, failures int, d time.Duration) {
			var se *transport.StatusError
			if errors.As(err, &se) && se.Status == 429 {
				t.d.Status.Raise(condition.Throttled, fmt.Sprintf("the hub throttled a twin operation (429); retrying in %s", d.Round(time.Millisecond)))
			}
			t.d.Log.Warn(msg, "err", err, "retry_in", d.Round(time.Millisecond))
		},
	}
}

// sync reads the desired properties (notifications are not replayed
// across reconnects) and reports the agent's version, state and
// certificate validity. A failed sync is retried (retry.Loop: the backoff,
// or the hub's retry-after if longer) until it succeeds (true, with the
// interval it reported) or the session ends.
func (t *Twin) sync(ctx context.Context, sess Session, id *provisioning.Identity) (intervalReport, bool) {
	// Versions are per device identity, which may have changed (another
	// hub or device id after re-provisioning): start afresh.
	t.mu.Lock()
	t.latest, t.interval = 0, 0
	t.mu.Unlock()
	var done syncDone
	attempts := 0
	err := t.retry("twin synchronisation failed; retrying").Do(ctx, func(ctx context.Context) error {
		attempts++
		return t.syncOnce(ctx, sess, id, &done)
	})
	if err != nil {
		return intervalReport{}, false // the session ended
	}
	if attempts > 1 {
		t.d.Log.Info("twin synchronised", "attempts", attempts)
	} else {
		t.d.Log.Debug("twin synchronised")
	}
	t.d.Status.Clear(condition.Throttled)
	return done.interval, true
}

// syncDone is what a sync has achieved so far: a retry after a throttled
// (429) step goes on from there instead of repeating the steps that worked,
// which under a hub-wide rate limit would be throttled in turn, forever.
type syncDone struct {
	read, reported bool
	interval       intervalReport
}

func (t *Twin) syncOnce(ctx context.Context, sess Session, id *provisioning.Identity, done *syncDone) error {
	if !done.read {
		var tw *transport.Twin
		err := t.request(ctx, "read (GET)", func(ctx context.Context) (err error) {
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
		t.apply(tw.Desired, v.Version)
		done.read = true
	}
	if !done.reported {
		report := map[string]any{
			"agent": map[string]any{"version": t.d.Version, "state": t.d.Status.Snapshot().State, "startedAt": t.d.Status.Started().UTC()},
			"certificate": map[string]any{
				"validFrom": id.NotBefore.UTC().Format(time.RFC3339), "validUntil": id.NotAfter.UTC().Format(time.RFC3339),
				"serial": id.Serial, "via": id.Via,
			},
		}
		err := t.request(ctx, "report of agent and certificate (PATCH reported)", func(ctx context.Context) error {
			_, err := sess.PatchReported(ctx, report)
			return err
		})
		if err != nil {
			return err
		}
		done.reported = true
	}
	r := t.inEffect()
	if err := t.reportInterval(ctx, sess, r); err != nil {
		return err
	}
	done.interval = r
	return nil
}

// OnMethod answers a direct method (on the MQTT client's goroutine; it
// never blocks).
func (t *Twin) OnMethod(name string, payload []byte) (int, []byte) {
	t.d.Log.Info("direct method", "name", name)
	switch name {
	case "ping":
		b, _ := json.Marshal(map[string]any{"pong": true, "time": t.d.Clock.Now().UTC(), "version": t.d.Version, "state": t.d.Status.Snapshot().State})
		return 200, b
	case "renewCertificate":
		if t.d.Static() {
			return 409, []byte(`{"accepted":false,"message":"static mode: the factory certificate is not renewed by gwagent"}`)
		}
		t.d.RequestRenewal("renewCertificate direct method")
		return 202, []byte(`{"accepted":true,"message":"renewal started; watch the twin's reported certificate"}`)
	}
	return 404, []byte(`{"error":"unknown method"}`)
}
