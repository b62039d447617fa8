package agent

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fsnotify/fsnotify"

	"github.com/gwagent/gwagent/internal/backoff"
	"github.com/gwagent/gwagent/internal/tlsconf"
	"github.com/gwagent/gwagent/keystore"
	"github.com/gwagent/gwagent/provisioning"
	"github.com/gwagent/gwagent/transport"
)

// Options are how the caller (cmd/gwagent, tests, a fleet simulation) sets
// up an Agent. Nothing here is global: many agents can run in one process.
type Options struct {
	// Logger receives structured logs; LogLevel is adjusted on reload.
	Logger   *slog.Logger
	LogLevel *slog.LevelVar
	// Version and BuildTime identify the build. A clock before BuildTime
	// is taken as unsynchronised.
	Version   string
	BuildTime time.Time
	// Now is the clock; default time.Now.
	Now func() time.Time
	// RetryAfterMin shortens DPS's retry-after clamp (tests only).
	RetryAfterMin time.Duration
	// Backoff for reconnects and re-provisioning; default 1 s to 5 min.
	Backoff backoff.Policy
	// ClockPoll is how often an unsynchronised clock is checked; default 5 s.
	ClockPoll time.Duration
}

// Agent is one running gwagent: one device identity, one hub session at a
// time, one outbox.
type Agent struct {
	cfgPath string
	cfg     atomic.Pointer[Config]
	opts    Options
	log     *slog.Logger
	notify  *notifier
	status  *statusTracker
	keys    *Keys
	store   *provisioning.Store
	outbox  *transport.Outbox
	rng     *rand.Rand

	interval atomic.Int64  // current health interval (ns): config or twin
	kick     chan struct{} // wakes the sender when the outbox got messages
	retimer  chan struct{} // wakes the health loop when the interval changed

	mu      sync.Mutex
	sess    *transport.Session
	endSess func() // ends the current session (renewal swap)
	started time.Time

	// Renewal (renew.go). renewFailures, retryAt and pending are guarded
	// by mu; swapFailures is the lifecycle goroutine's own.
	seed          []byte
	crashAt       string
	renewNow      chan string
	renewFailures int
	retryAt       time.Time
	pending       *pendingIssue
	swapFailures  int
}

// New loads the config and prepares an agent; Run starts it.
func New(cfgPath string, opts Options) (*Agent, error) {
	cfg, err := LoadConfig(cfgPath)
	if err != nil {
		return nil, err
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.NewTextHandler(os.Stderr, nil))
	}
	if opts.Backoff.Min == 0 {
		opts.Backoff = backoff.Policy{Min: time.Second, Max: 5 * time.Minute}
	}
	if opts.ClockPoll == 0 {
		opts.ClockPoll = 5 * time.Second
	}
	a := &Agent{
		cfgPath:  cfgPath,
		opts:     opts,
		log:      opts.Logger,
		notify:   newNotifier(),
		keys:     NewKeys(),
		kick:     make(chan struct{}, 1),
		retimer:  make(chan struct{}, 1),
		renewNow: make(chan string, 1),
		crashAt:  os.Getenv(crashEnv),
		rng:      rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), uint64(os.Getpid()))),
	}
	a.cfg.Store(cfg)
	a.applyLogLevel(cfg)
	a.interval.Store(int64(cfg.Telemetry.Interval.Duration))
	return a, nil
}

func (a *Agent) applyLogLevel(cfg *Config) {
	if a.opts.LogLevel == nil {
		return
	}
	var l slog.Level
	l.UnmarshalText([]byte(cfg.LogLevel))
	a.opts.LogLevel.Set(l)
}

// Run runs the agent until ctx is cancelled; cancellation is a clean
// shutdown and returns nil.
func (a *Agent) Run(ctx context.Context) error {
	cfg := a.cfg.Load()
	a.started = a.opts.Now()
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return fmt.Errorf("state directory: %w; create it or fix state_dir", err)
	}
	a.status = newStatusTracker(cfg.StateDir, a.log, a.notify, a.opts.Now, a.opts.Version)
	store, err := provisioning.OpenStore(cfg.StateDir)
	if err != nil {
		return err
	}
	a.store = store
	a.seed = a.renewalSeed()
	a.outbox, err = transport.OpenOutbox(filepath.Join(cfg.StateDir, "outbox"), transport.OutboxOptions{MaxBytes: cfg.Outbox.MaxBytes})
	if err != nil {
		return err
	}
	defer a.shutdown()
	if err := os.MkdirAll(cfg.Telemetry.SpoolDir, 0o770); err != nil {
		return fmt.Errorf("spool directory: %w", err)
	}

	var wg sync.WaitGroup
	defer wg.Wait()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	// READY once the agent works: state loaded, queue open. Not gated on
	// the hub: an outage must not fail the boot.
	a.notify.ready()
	a.status.Update(true, func(*Status) {})

	wg.Add(3)
	go func() { defer wg.Done(); a.watchConfig(ctx) }()
	go func() { defer wg.Done(); a.healthLoop(ctx) }()
	go func() { defer wg.Done(); a.spoolLoop(ctx) }()

	a.lifecycle(ctx)
	return nil
}

func (a *Agent) shutdown() {
	a.notify.stopping()
	if a.status != nil {
		a.status.Set(StateStopped)
	}
	if a.outbox != nil {
		if err := a.outbox.Close(); err != nil {
			a.log.Error("outbox close", "err", err)
		}
	}
	a.keys.Close()
}

// lifecycle is the state machine: wait for a sane clock, make sure there is
// a valid identity (provisioning if not), connect, serve, reconnect.
func (a *Agent) lifecycle(ctx context.Context) {
	wd := watchdogInterval()
	var wdC <-chan time.Time
	if wd > 0 {
		t := time.NewTicker(wd)
		defer t.Stop()
		wdC = t.C
	}
	failures := 0
	wait := func(d time.Duration) bool {
		timer := time.NewTimer(d)
		defer timer.Stop()
		for {
			select {
			case <-ctx.Done():
				return false
			case <-wdC:
				a.notify.watchdog()
			case <-timer.C:
				return true
			}
		}
	}
	for ctx.Err() == nil {
		id, err := a.identity(ctx)
		if err != nil {
			failures++
			d := a.opts.Backoff.Delay(failures, a.rng)
			a.log.Error("no usable identity", "err", err, "retry_in", d.Round(time.Second))
			if !wait(d) {
				return
			}
			continue
		}
		if !a.clockSane(ctx, id, wait) {
			return
		}
		if a.opts.Now().After(id.NotAfter) {
			a.status.Raise(CondCertificateExpired, "certificate expired at "+id.NotAfter.Format(time.RFC3339))
			if a.cfg.Load().Static() {
				a.status.Set(StateDegraded)
				if !wait(a.opts.Backoff.Delay(failures, a.rng)) {
					return
				}
				failures++
				continue
			}
			a.log.Warn("operational certificate expired; re-provisioning through DPS", "not_after", id.NotAfter)
			if _, err := a.provision(ctx); err != nil {
				failures++
				if !wait(a.opts.Backoff.Delay(failures, a.rng)) {
					return
				}
			}
			continue
		}
		a.status.Clear(CondCertificateExpired)
		if !a.cfg.Load().Static() {
			if sess, next := a.trySwap(ctx); sess != nil {
				failures = 0
				a.status.Clear(CondHubUnreachable)
				a.status.Set(StateConnected)
				if !a.connected(ctx, sess, next, wdC, wait) {
					return
				}
				continue
			}
		}
		if failures > 0 {
			a.status.Set(StateReconnecting)
		} else {
			a.status.Set(StateConnecting)
		}
		sess, err := a.dial(ctx, id)
		if err != nil {
			failures++
			d := a.opts.Backoff.Delay(failures, a.rng)
			a.status.Raise(CondHubUnreachable, err.Error())
			if errors.Is(err, transport.ErrUnauthorized) && !a.cfg.Load().Static() {
				// The documented recovery: the hub no longer accepts this
				// identity (disabled, deleted, moved); register again.
				a.log.Warn("hub refused our identity; re-provisioning through DPS", "err", err)
				if _, perr := a.provision(ctx); perr == nil {
					continue
				}
			}
			a.log.Warn("hub connection failed", "err", err, "retry_in", d.Round(time.Millisecond))
			if !wait(d) {
				return
			}
			continue
		}
		failures = 0
		a.status.Clear(CondHubUnreachable)
		a.status.Set(StateConnected)
		if !a.connected(ctx, sess, id, wdC, wait) {
			return
		}
		failures = 1
	}
}

// connected serves a session until it ends; false means the agent stops.
func (a *Agent) connected(ctx context.Context, sess *transport.Session, id *provisioning.Identity, wdC <-chan time.Time, wait func(time.Duration) bool) bool {
	a.serve(ctx, sess, id, wdC)
	if ctx.Err() != nil {
		sess.Close()
		return false
	}
	if _, err := a.store.Next(); err == nil {
		sess.Close()
		a.log.Info("switching to the renewed certificate")
		return true
	}
	a.log.Warn("hub connection lost", "err", sess.Err())
	a.status.Set(StateReconnecting)
	return wait(a.opts.Backoff.Delay(0, a.rng))
}

// identity returns the identity to connect with: the static one from the
// config, or the committed DPS identity (provisioning first if none).
func (a *Agent) identity(ctx context.Context) (*provisioning.Identity, error) {
	cfg := a.cfg.Load()
	if cfg.Static() {
		chain, err := tlsconf.LoadChain(cfg.Hub.Chain)
		if err != nil {
			return nil, fmt.Errorf("[hub] chain: %w", err)
		}
		return &provisioning.Identity{KeyURI: cfg.Operational.Key, DeviceID: cfg.Hub.DeviceID, AssignedHub: cfg.Hub.Host,
			Chain: chain, ChainPath: cfg.Hub.Chain, NotBefore: chain[0].NotBefore, NotAfter: chain[0].NotAfter,
			Serial: chain[0].SerialNumber.Text(16), Via: "factory"}, nil
	}
	id, err := a.store.Current()
	if errors.Is(err, provisioning.ErrNotProvisioned) {
		a.status.Set(StateNotProvisioned)
		return a.provision(ctx)
	}
	if err != nil {
		return nil, err
	}
	a.noteIdentity(id)
	return id, nil
}

func (a *Agent) noteIdentity(id *provisioning.Identity) {
	a.status.Update(true, func(s *Status) {
		s.DeviceID, s.Hub, s.CertSerial, s.CertNotAfter = id.DeviceID, id.AssignedHub, id.Serial, id.NotAfter
	})
}

// provision registers through DPS and commits the new identity.
func (a *Agent) provision(ctx context.Context) (*provisioning.Identity, error) {
	a.status.Set(StateProvisioning)
	cfg := a.cfg.Load()
	id, err := Provision(ctx, cfg, a.keys, ProvisionOptions{
		Now:           a.opts.Now,
		RetryAfterMin: a.opts.RetryAfterMin,
		ClientVersion: "gwagent/" + a.opts.Version,
		Progress:      func(s string) { a.log.Info("provisioning", "step", s) },
	})
	switch {
	case err == nil:
		a.status.Clear(CondOnboardingRejected)
		a.status.Clear(CondProvisioningFailed)
		a.status.Clear(CondKeyStoreUnavailable)
		a.log.Info("provisioned", "device_id", id.DeviceID, "hub", id.AssignedHub, "serial", id.Serial, "not_after", id.NotAfter)
		a.noteIdentity(id)
		return id, nil
	case errors.Is(err, provisioning.ErrCredentialRejected):
		a.status.Raise(CondOnboardingRejected, err.Error())
	case errors.Is(err, keystore.ErrDeviceAbsent), errors.Is(err, keystore.ErrDeviceBusy), errors.Is(err, keystore.ErrBadPIN),
		errors.Is(err, keystore.ErrTokenAbsent), errors.Is(err, keystore.ErrUnsupportedCurve):
		a.status.Raise(CondKeyStoreUnavailable, err.Error())
	default:
		a.status.Raise(CondProvisioningFailed, err.Error())
	}
	a.status.Set(StateDegraded)
	a.log.Error("provisioning failed", "err", err)
	return nil, err
}

// clockSane waits while the clock is before the build time or before the
// certificate's notBefore (a gateway without RTC boots in 1970): TLS and
// renewal decisions are meaningless until time is synchronised.
func (a *Agent) clockSane(ctx context.Context, id *provisioning.Identity, wait func(time.Duration) bool) bool {
	for {
		now := a.opts.Now()
		floor := a.opts.BuildTime
		if nb := id.NotBefore.Add(-5 * time.Minute); nb.After(floor) {
			floor = nb
		}
		if !now.Before(floor) {
			a.status.Clear(CondClockNotSynced)
			return true
		}
		a.status.Raise(CondClockNotSynced, fmt.Sprintf("clock says %s, before %s; waiting for time synchronisation (NTP)", now.UTC().Format(time.RFC3339), floor.UTC().Format(time.RFC3339)))
		a.status.Set(StateWaitingForClock)
		if !wait(a.opts.ClockPoll) {
			return false
		}
	}
}

// dial opens a hub session with the identity's key and chain.
func (a *Agent) dial(ctx context.Context, id *provisioning.Identity) (*transport.Session, error) {
	cfg := a.cfg.Load()
	u, err := keystore.Parse(id.KeyURI)
	if err != nil {
		return nil, err
	}
	signer, err := a.keys.Signer(ctx, u)
	if err != nil {
		a.status.Raise(CondKeyStoreUnavailable, err.Error())
		return nil, fmt.Errorf("operational key: %w", err)
	}
	a.status.Clear(CondKeyStoreUnavailable)
	roots, err := tlsconf.LoadPool(cfg.TrustBundle)
	if err != nil {
		return nil, err
	}
	dctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	return transport.Dial(dctx, transport.Config{
		Host:          id.AssignedHub,
		DeviceID:      id.DeviceID,
		APIVersion:    cfg.Hub.APIVersion,
		Roots:         roots,
		Signer:        signer,
		Chain:         id.Chain,
		KeepAlive:     cfg.Hub.KeepAlive.Duration,
		ClientVersion: "gwagent/" + a.opts.Version,
		OnDesired:     a.onDesired,
		OnMethod:      a.onMethod,
		OnCredentials: a.onCredentials,
		OnC2D: func(sys, app map[string]string, body []byte) {
			a.log.Info("cloud-to-device message", "id", sys["mid"], "bytes", len(body))
		},
	})
}

// serve runs one connected session: report to the twin, drain the outbox,
// until the connection drops or ctx ends.
func (a *Agent) serve(ctx context.Context, sess *transport.Session, id *provisioning.Identity, wdC <-chan time.Time) {
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	a.mu.Lock()
	a.sess, a.endSess = sess, cancel
	a.mu.Unlock()
	defer func() {
		a.mu.Lock()
		a.sess, a.endSess = nil, nil
		a.mu.Unlock()
	}()
	go func() {
		select {
		case <-sess.Done():
			cancel()
		case <-sctx.Done():
		}
	}()
	go a.syncTwin(sctx, sess, id)
	go a.renewLoop(sctx, sess, id, cancel)
	drained := make(chan struct{})
	go func() { defer close(drained); a.drain(sctx, sess) }()
	for {
		select {
		case <-sctx.Done():
			<-drained
			return
		case <-wdC:
			a.notify.watchdog()
		}
	}
}

// drain sends queued messages in order, pipelining up to window publishes,
// and acks each in the outbox after its PUBACK.
func (a *Agent) drain(ctx context.Context, sess *transport.Session) {
	const window = 64
	type inflight struct {
		m    *transport.Message
		wait func(context.Context) error
	}
	var last uint64
	for ctx.Err() == nil {
		msgs, err := a.outbox.Next(last, window)
		if err != nil {
			a.log.Error("outbox read", "err", err)
			return
		}
		if len(msgs) == 0 {
			select {
			case <-ctx.Done():
				return
			case <-a.kick:
			}
			continue
		}
		q := make([]inflight, 0, len(msgs))
		for _, m := range msgs {
			sys := map[string]string{"mid": m.ID}
			for k, v := range m.System {
				sys[k] = v
			}
			q = append(q, inflight{m, sess.PublishTelemetry(m.Body, sys, m.App)})
		}
		for _, f := range q {
			if err := f.wait(ctx); err != nil {
				return // resent from the outbox on the next connection
			}
			if err := a.outbox.Ack(f.m.Seq); err != nil {
				a.log.Error("outbox ack", "err", err)
			}
			if f.m.Local != "" {
				if err := os.Remove(f.m.Local); err != nil && !errors.Is(err, os.ErrNotExist) {
					a.log.Warn("cannot delete sent spool file", "file", f.m.Local, "err", err)
				}
			}
			last = f.m.Seq
			a.status.Update(false, func(s *Status) { s.LastAckID, s.LastAckAt = f.m.ID, a.opts.Now().UTC() })
		}
		n, b := a.outbox.Depth()
		a.status.Update(false, func(s *Status) { s.OutboxDepth, s.OutboxBytes = n, b })
	}
}

// wake tells the sender there is something new in the outbox.
func (a *Agent) wake() {
	select {
	case a.kick <- struct{}{}:
	default:
	}
}

func (a *Agent) enqueue(msgs ...*transport.Message) error {
	evicted, err := a.outbox.Put(msgs...)
	if evicted > 0 {
		a.log.Warn("outbox full: dropped oldest health messages", "dropped", evicted)
	}
	if errors.Is(err, transport.ErrOutboxFull) {
		a.status.Raise(CondOutboxFull, err.Error())
	} else if err == nil {
		a.status.Clear(CondOutboxFull)
	}
	n, b := a.outbox.Depth()
	a.status.Update(false, func(s *Status) { s.OutboxDepth, s.OutboxBytes = n, b })
	a.wake()
	return err
}

// healthLoop queues a health message every interval.
// setInterval changes the health interval and restarts the wait for the
// next message with it.
func (a *Agent) setInterval(d time.Duration) (old time.Duration) {
	old = time.Duration(a.interval.Swap(int64(d)))
	select {
	case a.retimer <- struct{}{}:
	default:
	}
	return old
}

func (a *Agent) healthLoop(ctx context.Context) {
	// One at start, so the cloud sees a (re)started gateway at once.
	a.sendHealth()
	for {
		d := time.Duration(a.interval.Load())
		t := time.NewTimer(d)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-a.retimer:
			t.Stop()
			continue
		case <-t.C:
		}
		a.sendHealth()
	}
}

func (a *Agent) sendHealth() {
	cfg := a.cfg.Load()
	now := a.opts.Now()
	h := readHealth(now, cfg.StateDir)
	h.AgentUptime = now.Sub(a.started).Seconds()
	h.AgentVersion = a.opts.Version
	st := a.status.Snapshot()
	h.AgentState = st.State
	for c := range st.Conditions {
		h.ConditionsActive = append(h.ConditionsActive, string(c))
	}
	if !st.CertNotAfter.IsZero() {
		days := st.CertNotAfter.Sub(now).Hours() / 24
		h.CertDaysLeft = &days
	}
	h.OutboxDepth, _ = a.outbox.Depth()
	body, _ := json.Marshal(h)
	if err := a.enqueue(&transport.Message{Kind: transport.KindHealth, Body: body,
		System: map[string]string{"ct": "application/json", "ce": "utf-8"},
		App:    map[string]string{"type": "health"}}); err != nil {
		a.log.Warn("health message not queued", "err", err)
	}
}

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

// spoolLoop watches the spool directory for *.json files from local
// applications and queues each as one message; the file is deleted after
// the hub's PUBACK (drain). Writers should write a temporary name (starting
// with '.' or not ending in .json) and rename it into place.
func (a *Agent) spoolLoop(ctx context.Context) {
	w, err := fsnotify.NewWatcher()
	if err != nil {
		a.log.Error("spool watcher", "err", err)
		return
	}
	defer w.Close()
	dir := a.cfg.Load().Telemetry.SpoolDir
	if err := w.Add(dir); err != nil {
		a.log.Error("cannot watch spool directory", "dir", dir, "err", err)
		return
	}
	queued := a.queuedSpoolFiles()
	a.scanSpool(dir, queued)
	retry := time.NewTicker(30 * time.Second) // picks up files refused while the outbox was full
	defer retry.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case ev, ok := <-w.Events:
			if !ok {
				return
			}
			if ev.Op&(fsnotify.Create|fsnotify.Write) != 0 {
				a.spoolFile(ev.Name, queued)
			}
		case err := <-w.Errors:
			a.log.Warn("spool watcher", "err", err)
		case <-retry.C:
			if nd := a.cfg.Load().Telemetry.SpoolDir; nd != dir {
				w.Remove(dir)
				if err := w.Add(nd); err != nil {
					a.log.Error("cannot watch new spool directory", "dir", nd, "err", err)
				} else {
					a.log.Info("spool directory changed", "from", dir, "to", nd)
					dir = nd
				}
			}
			a.scanSpool(dir, queued)
		}
	}
}

// queuedSpoolFiles lists spool files already in the outbox (queued before a
// restart), so they are not queued twice.
func (a *Agent) queuedSpoolFiles() map[string]bool {
	out := map[string]bool{}
	var last uint64
	for {
		ms, err := a.outbox.Next(last, 256)
		if err != nil || len(ms) == 0 {
			return out
		}
		for _, m := range ms {
			if m.Local != "" {
				out[m.Local] = true
			}
			last = m.Seq
		}
	}
}

func (a *Agent) scanSpool(dir string, queued map[string]bool) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		a.log.Warn("spool directory", "err", err)
		return
	}
	for _, e := range ents {
		a.spoolFile(filepath.Join(dir, e.Name()), queued)
	}
}

func (a *Agent) spoolFile(path string, queued map[string]bool) {
	name := filepath.Base(path)
	if strings.HasPrefix(name, ".") || !strings.HasSuffix(name, ".json") || queued[path] {
		return
	}
	body, err := os.ReadFile(path)
	if err != nil {
		return // gone already, or still being written: the rename will tell us again
	}
	if !json.Valid(body) {
		a.log.Warn("spool file is not JSON; left in place", "file", path)
		return
	}
	// The id is a digest of name and content: if the agent dies after the
	// PUBACK but before deleting the file, the copy sent again carries the
	// same id and the cloud can drop it.
	sum := sha256.Sum256(append([]byte(name+"\x00"), body...))
	err = a.enqueue(&transport.Message{Kind: transport.KindApp, Body: body, Local: path, ID: "spool-" + hex.EncodeToString(sum[:12]),
		System: map[string]string{"ct": "application/json", "ce": "utf-8"}})
	if err != nil {
		a.log.Error("application message not queued; it stays in the spool directory", "file", path, "err", err)
		return
	}
	a.log.Debug("spool file queued", "file", path)
	queued[path] = true
}

// watchConfig reloads the config when its file changes (directory watch,
// so atomic replaces are seen), debounced; an invalid file is logged and
// the old config stays.
func (a *Agent) watchConfig(ctx context.Context) {
	w, err := fsnotify.NewWatcher()
	if err != nil {
		a.log.Error("config watcher", "err", err)
		return
	}
	defer w.Close()
	dir, file := filepath.Dir(a.cfgPath), filepath.Base(a.cfgPath)
	if err := w.Add(dir); err != nil {
		a.log.Error("cannot watch config directory", "dir", dir, "err", err)
		return
	}
	var debounce <-chan time.Time
	for {
		select {
		case <-ctx.Done():
			return
		case ev, ok := <-w.Events:
			if !ok {
				return
			}
			if filepath.Base(ev.Name) == file {
				debounce = time.After(300 * time.Millisecond)
			}
		case err := <-w.Errors:
			a.log.Warn("config watcher", "err", err)
		case <-debounce:
			debounce = nil
			a.reload()
		}
	}
}

// reload applies a changed config: telemetry interval, spool directory, log
// level take effect now; identity changes and the outbox bound need a restart.
func (a *Agent) reload() {
	next, err := LoadConfig(a.cfgPath)
	if err != nil {
		a.log.Error("config change rejected; keeping the running config", "err", err)
		return
	}
	old := a.cfg.Load()
	if next.Identity != old.Identity || next.Onboarding != old.Onboarding || next.Operational != old.Operational ||
		next.Hub != old.Hub || next.StateDir != old.StateDir || next.TrustBundle != old.TrustBundle {
		a.log.Warn("config change affects the device identity or connection; restart gwagent to apply it (systemctl restart gwagent)")
		// Apply what can be applied; keep the identity-related parts.
		next.Identity, next.Onboarding, next.Operational, next.Hub = old.Identity, old.Onboarding, old.Operational, old.Hub
		next.StateDir, next.TrustBundle = old.StateDir, old.TrustBundle
	}
	a.cfg.Store(next)
	a.applyLogLevel(next)
	if next.Telemetry.Interval != old.Telemetry.Interval {
		a.setInterval(next.Telemetry.Interval.Duration)
	}
	a.log.Info("config reloaded", "telemetry_interval", next.Telemetry.Interval.Duration, "spool_dir", next.Telemetry.SpoolDir, "log_level", next.LogLevel)
}
