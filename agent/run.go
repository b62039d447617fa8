package agent

import (
	"context"
	"errors"
	"log/slog"
	"math/rand/v2"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fsnotify/fsnotify"

	"github.com/gwagent/gwagent/agent/health"
	"github.com/gwagent/gwagent/agent/sdnotify"
	"github.com/gwagent/gwagent/agent/status"
	"github.com/gwagent/gwagent/agent/twin"
	"github.com/gwagent/gwagent/internal/clock"
	"github.com/gwagent/gwagent/internal/clocksync"
	"github.com/gwagent/gwagent/internal/retry"
	"github.com/gwagent/gwagent/internal/statelock"
	"github.com/gwagent/gwagent/provisioning"
	"github.com/gwagent/gwagent/renewal"
	"github.com/gwagent/gwagent/telemetry"
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
	// Clock times the lifecycle, renewal, retries and DPS, and is the
	// agent's judgement of its own certificates (schedule, expiry, the
	// validity of an issued chain); default clock.Real. TLS verification
	// of the servers' certificates keeps Go's clock (tls.Config.Time is not
	// set): on a device both are the system clock, and a server is never
	// trusted on a test's fake time. Tests give a clock.Fake, and the same
	// to azsim (azsim.Config.Now), so that certificates are issued, checked
	// by the hub and judged by the agent in one time.
	Clock clock.Clock
	// Backoff for reconnects and re-provisioning; default 1 s to 5 min.
	Backoff retry.Policy
	// TwinTimeout bounds each twin request on its own; default 30 s.
	TwinTimeout time.Duration
	// ClockPoll is how often an unsynchronised clock is checked; default 5 s.
	ClockPoll time.Duration
	// ClockSync says what vouches for the system clock (clocktrust.go);
	// default clocksync.System().Read. ClockSyncWait is how long after
	// boot a clock nothing vouches for is waited on; default 2 min.
	ClockSync     func(now time.Time) clocksync.Reading
	ClockSyncWait time.Duration
	// Reprovision bounds re-registrations after the hub refused the
	// identity (renewal/reprovision.go); default 1 min to 1 h backoff, 4
	// per hour.
	Reprovision ReprovisionPolicy
	// Backlog, if set, is told when the drain starts sending a backlog
	// (true) and when the outbox is empty again (false); cmd/gwagent raises
	// the Go runtime's GC target for the while.
	Backlog func(bool)
	// RestartWithNewIdentity, if set, is asked once this process
	// registered with DPS or staged a renewed certificate, before the agent
	// connects with the new identity; true ends Run with ErrRestart, after
	// the same orderly shutdown as a
	// cancelled ctx (nothing queued is lost). cmd/gwagent then executes
	// itself again, so the process that serves the hub for months does not
	// carry what the registration or renewal left in memory: the P-384
	// generator table Go's crypto builds to verify the issued chain and
	// keeps for the process's life (236 KiB), and the heap's fragmentation.
	// make bench, 1 reading/s: 3.18 MiB of anonymous memory without, 2.75
	// MiB with. A staged renewal is tried on start (renewal.TrySwap), as
	// after a crash.
	RestartWithNewIdentity func() bool
	// newWatcher stands in for fsnotify.NewWatcher in tests (export_test.go):
	// inotify that cannot be had is a fault the kernel gives only when its
	// per-user instance limit is used up, which would break other tests.
	newWatcher func() (*fsnotify.Watcher, error)
	// newInotify does the same for the spool's raw inotify watch.
	newInotify func() (int, error)
}

// Agent is one running gwagent: one device identity, one hub session at a
// time, one outbox.
type Agent struct {
	cfg     atomic.Pointer[Config]
	opts    Options
	log     *slog.Logger
	sd      *sdnotify.Notifier // systemd: READY, STATUS, the watchdog
	status  *status.Tracker
	keys    *Keys
	store   *provisioning.Store
	renewal *renewal.Renewer
	clock   clock.Clock
	pipe    *telemetry.Pipeline // spool, outbox, drain (set by Run)
	rng     *rand.Rand

	health *health.Loop // the health messages and their interval
	twin   *twin.Twin   // the twin and direct methods

	hub   hubLink    // the session being served, the hub's callbacks
	trust clockTrust // the lifecycle goroutine's own

	// provisioned: a.provision stored a new identity not yet connected with;
	// restarting: Run ends with ErrRestart (Options.RestartWithNewIdentity).
	provisioned, restarting bool
}

// ErrRestart is Run's answer when Options.RestartWithNewIdentity asked for
// a fresh process to connect with a new identity: the caller starts the
// agent again.
var ErrRestart = errors.New("agent: new identity; restart to connect from a fresh process")

// New loads the config and prepares an agent; Run starts it.
func New(cfgPath string, opts Options) (*Agent, error) {
	cfg, err := LoadConfig(cfgPath)
	if err != nil {
		return nil, err
	}
	opts.Clock = clock.Or(opts.Clock)
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.NewTextHandler(os.Stderr, nil))
	}
	if opts.Backoff.Min == 0 {
		opts.Backoff = retry.Policy{Min: time.Second, Max: 5 * time.Minute}
	}
	if opts.TwinTimeout == 0 {
		opts.TwinTimeout = twin.RequestTimeout
	}
	if opts.ClockPoll == 0 {
		opts.ClockPoll = 5 * time.Second
	}
	if opts.ClockSync == nil {
		opts.ClockSync = clocksync.System().Read
	}
	if opts.ClockSyncWait == 0 {
		opts.ClockSyncWait = defaultClockSyncWait
	}
	a := &Agent{
		opts:  opts,
		log:   opts.Logger,
		sd:    sdnotify.New(opts.Clock),
		keys:  agentKeys(opts.Logger),
		clock: opts.Clock,
		rng:   rand.New(rand.NewPCG(uint64(opts.Clock.Now().UnixNano()), uint64(os.Getpid()))),
	}
	a.renewal = a.newRenewer(os.Getenv(renewal.CrashEnv))
	a.cfg.Store(cfg)
	a.applyLogLevel(cfg)
	a.status = status.New(cfg.StateDir, a.log, a.sd.Status, a.clock, opts.Version)
	a.health = health.New(cfg.Telemetry.Interval.Duration, health.Deps{Clock: a.clock, Log: a.log, Version: opts.Version,
		Status: a.status, StateDir: func() string { return a.cfg.Load().StateDir }})
	a.twin = twin.New(twin.Deps{Clock: a.clock, Log: a.log, Version: opts.Version, Interval: a.health, Status: a.status,
		Backoff: opts.Backoff, Timeout: opts.TwinTimeout, Static: func() bool { return a.cfg.Load().Static() },
		RequestRenewal: a.RequestRenewal})
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
func (a *Agent) Run(ctx context.Context) (err error) {
	cfg := a.cfg.Load()
	defer func() { err = spaceAdvice(cfg, err) }() // a fresh state directory on a full disk
	lock, err := statelock.Take(cfg.StateDir)
	if err != nil {
		return err
	}
	defer lock.Unlock()
	store, err := provisioning.OpenStore(cfg.StateDir)
	if err != nil {
		return err
	}
	a.store = store
	a.renewal.Start(store)
	if err := a.openPipeline(cfg); err != nil {
		return err
	}
	defer a.shutdown()

	var wg sync.WaitGroup
	defer wg.Wait()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	a.hub.ctx = ctx

	// READY once the agent works: state loaded, queue open. Not gated on
	// the hub: an outage must not fail the boot.
	a.sd.Ready()
	a.status.Update(true, func(*Status) {})

	wg.Add(4)
	go func() { defer wg.Done(); a.sd.Watchdog(ctx, a.log) }()
	go func() { defer wg.Done(); a.pipe.Run(ctx) }()
	go func() { defer wg.Done(); a.watchConfig(ctx) }()
	go func() { defer wg.Done(); a.health.Run(ctx, a.pipe) }()

	a.lifecycle(ctx)
	if a.restarting {
		return ErrRestart
	}
	return nil
}

func (a *Agent) shutdown() {
	if !a.restarting { // the same service goes on in the next process
		a.sd.Stopping()
		if a.status != nil {
			a.status.Set(status.Stopped)
		}
	}
	a.hub.closeAndWait() // before the key stores and the outbox close
	if a.pipe != nil {
		if err := a.pipe.Close(); err != nil {
			a.log.Error("outbox close", "err", err)
		}
	}
	a.keys.Close()
}
