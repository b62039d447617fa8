// Package renewal keeps a gwagent device's operational certificate valid:
// when to renew (a pure schedule with a per-device jitter draw persisted so
// restarts do not re-roll it), how (the hub's certificate-signing API, with
// the request recorded so a reconnect or restart waits for its answer; DPS
// re-registration as the fallback), what happens after a failure (retry on
// the retry.Policy, sooner once a full disk has room again), the swap to the
// new pair with rollback when the hub refuses it, and the re-provisioning
// gate for a hub that refuses the identity.
//
// It is one of the agent's own parts: only agent/ imports it. It talks to
// the agent through Deps (the status sink, key slots, the identity store,
// DPS, the session-making) and to the hub through the session it is handed;
// it times everything on the injected clock.Clock and logs through the
// logger the agent gives it.
package renewal

import (
	"context"
	"crypto"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/gwagent/gwagent/internal/clock"
	"github.com/gwagent/gwagent/internal/condition"
	"github.com/gwagent/gwagent/internal/diskspace"
	"github.com/gwagent/gwagent/internal/retry"
	"github.com/gwagent/gwagent/keystore"
	"github.com/gwagent/gwagent/provisioning"
	"github.com/gwagent/gwagent/transport"
)

// CondFailed: the last renewal failed; the current certificate stays in
// use and the renewal is retried. Cleared when a renewed pair is in use.
const CondFailed condition.Name = "renewal-failed"

// Settings are the parts of the agent's configuration renewal reads; the
// agent hands a function returning the current ones (config reload).
type Settings struct {
	StateDir string
	// Static: a factory certificate, renewed by the factory's process.
	Static bool
	Policy Policy
	// Retry paces attempts after a failure ([renewal] retry_min/max).
	Retry retry.Policy
	// PreferHub renews through the hub's certificate API, DPS as the
	// fallback; false goes to DPS directly.
	PreferHub bool
	// IssueTimeout bounds the wait for the hub's answer.
	IssueTimeout time.Duration
	// Rotate makes a new key for every certificate (the free slot).
	Rotate bool
}

// Keys are the key slots renewal uses (the agent's key stores).
type Keys interface {
	Signer(ctx context.Context, u *keystore.URI) (crypto.Signer, error)
	// Fresh replaces whatever key is in slot u with a new one.
	Fresh(ctx context.Context, u *keystore.URI) (crypto.Signer, error)
	Delete(ctx context.Context, u *keystore.URI) error
}

// Status is the agent's status tracker as renewal sees it.
type Status interface {
	condition.Sink
	// NextRenewal shows the planned renewal time.
	NextRenewal(at time.Time)
	// Swapping says the agent is trying a staged pair.
	Swapping()
	// InUse shows the identity now in use.
	InUse(id *provisioning.Identity)
}

// Disk is the agent's full-disk bookkeeping (condition.DiskFull, raised and
// cleared through the one status tracker).
type Disk interface {
	// Full reports whether disk-full is raised.
	Full() bool
	// RoomAgain clears disk-full if the file systems have room again, and
	// reports whether it did.
	RoomAgain() bool
	// Advise adds which file system is full and what to do to an error
	// that says so, and raises disk-full; other errors pass unchanged.
	Advise(err error) error
	// Wrote is told that writing a key or identity succeeded.
	Wrote()
}

// Hub is the session's certificate API (transport.Session).
type Hub interface {
	IssueCertificate(ctx context.Context, req transport.IssueRequest) ([]string, error)
	WatchCredentials(ctx context.Context) error
}

// Deps are what the agent hands renewal. All are required but CrashAt
// (and Store, which Start may give).
type Deps struct {
	Log      *slog.Logger
	Clock    clock.Clock
	Status   Status
	Disk     Disk
	Store    *provisioning.Store
	Keys     Keys
	Settings func() Settings
	// FreeSlot is the key slot the current identity does not use.
	FreeSlot func() (*keystore.URI, error)
	// RegisterDPS registers with DPS and stages the new identity.
	RegisterDPS func(ctx context.Context) (*provisioning.Identity, error)
	// Reprovision registers with DPS and commits the new identity (after
	// the hub refused ours); it calls NoteRegistration.
	Reprovision func(ctx context.Context) error
	// Dial opens a hub session with an identity (the agent makes sessions).
	Dial func(ctx context.Context, id *provisioning.Identity) (*transport.Session, error)
	// EndSession ends the current hub session so the lifecycle swaps to
	// the staged identity.
	EndSession func()
	// Reprovisioning bounds re-registrations after refusals.
	Reprovisioning ReprovisionPolicy
	// CrashAt names a step at which the process kills itself (tests only,
	// CrashEnv).
	CrashAt string
}

// Renewer is one device's renewal. Its Run runs on the session's goroutine;
// Refused, Connected, ReprovisionAfterRefusal, NoteRegistration and TrySwap
// on the lifecycle goroutine; OnCredentials on the MQTT client's.
type Renewer struct {
	d     Deps
	log   *slog.Logger
	clock clock.Clock
	now   chan string // renewal requests (RequestRenewal)

	mu            sync.Mutex
	seed          []byte
	failures      int // renewals failed in a row
	retryAt       time.Time
	pending       *pendingIssue
	hubUnanswered int  // certificate requests in a row the hub never answered
	stagedHere    bool // this Renewer staged a new generation (TakeStaged)

	// The lifecycle goroutine's own.
	swapFailures   int
	swapRejections int
	gate           gate
	hsRejections   int
	rng            *rand.Rand
}

// New prepares a Renewer; Start completes it (Deps.Store may be nil until
// then).
func New(d Deps) *Renewer {
	d.Clock = clock.Or(d.Clock)
	return &Renewer{
		d: d, log: d.Log, clock: d.Clock, now: make(chan string, 1),
		gate: gate{policy: d.Reprovisioning.withDefaults()},
		rng:  rand.New(rand.NewPCG(uint64(d.Clock.Now().UnixNano()), uint64(os.Getpid()))),
	}
}

// Start hands the Renewer the opened identity store and loads (or makes)
// the device's renewal seed in the state directory; before any other
// method but Request.
func (r *Renewer) Start(store *provisioning.Store) {
	r.d.Store = store
	seed, err := loadSeed(r.d.Settings().StateDir)
	if err != nil {
		r.log.Warn("cannot persist the renewal seed; the jitter will be drawn again after a restart", "err", err)
	}
	r.mu.Lock()
	r.seed = seed
	r.mu.Unlock()
}

// Renewal, as a sequence of named steps (the crash tests stop the agent at
// each one, see CrashEnv):
//
//	renew-key-created  a new key exists in the free slot
//	renew-staged       the new chain is validated and staged as "next"
//	swap-connected     the hub accepted a connection with the new pair
//	swap-committed     "next" became "current"
//	swap-old-key-gone  the previous key is deleted
//
// At every step the device holds at least one pair the hub accepts: the
// current generation is only replaced after the new one connected, and a
// staged generation is tried (and rolled back if refused) on start.

// staged notes a new generation staged by this Renewer.
func (r *Renewer) staged() {
	r.mu.Lock()
	r.stagedHere = true
	r.mu.Unlock()
	r.step("renew-staged")
}

// TakeStaged reports whether this Renewer, in this process, staged a new
// generation since the last call (the agent then connects with it from a
// fresh process).
func (r *Renewer) TakeStaged() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	staged := r.stagedHere
	r.stagedHere = false
	return staged
}

// CrashEnv names a step at which the agent kills itself (tests only).
const CrashEnv = "GWAGENT_TEST_CRASH_AT"

func (r *Renewer) step(name string) {
	if r.d.CrashAt != "" && r.d.CrashAt == name {
		r.log.Warn("test hook: killing the agent", "step", name)
		syscall.Kill(os.Getpid(), syscall.SIGKILL)
		select {} // SIGKILL is not deliverable to ourselves late; wait for it
	}
}

// Request asks the running renewal to renew now (direct method, SIGHUP,
// `gwagent renew`). It does not wait.
func (r *Renewer) Request(why string) {
	select {
	case r.now <- why:
	default: // one request is already queued
	}
}

// diskCheckEvery is how often the renewal looks whether space was freed
// while disk-full is raised (a statfs, nothing written).
const diskCheckEvery = 5 * time.Second

// Run waits for the planned renewal time (or a request) while the session
// is up, and renews. On success it ends the session (Deps.EndSession) so
// the lifecycle swaps to the staged identity.
func (r *Renewer) Run(ctx context.Context, hub Hub, id *provisioning.Identity) {
	set := r.d.Settings()
	if set.Static {
		return // a factory certificate is renewed by the factory's process
	}
	r.mu.Lock()
	dr := draw(r.seed, id.Serial)
	p := r.pending
	r.mu.Unlock()
	if p == nil {
		r.loadPending(ctx, id)
		r.mu.Lock()
		p = r.pending
		r.mu.Unlock()
	}
	if p != nil && p.id.Serial == id.Serial {
		// The answer to a request the hub accepted before the reconnect
		// comes on the credentials topic, subscribed only while renewing.
		if err := hub.WatchCredentials(ctx); err != nil {
			r.log.Warn("cannot wait for the pending certificate answer on this connection", "err", err)
		}
		// If it does not come soon, it was lost with the old connection:
		// ask again then (hub.go, answerGrace).
		r.mu.Lock()
		p.askAt = r.clock.Now().Add(answerGrace)
		r.mu.Unlock()
	}
	for ctx.Err() == nil {
		policy := r.d.Settings().Policy
		now := r.clock.Now()
		due, why := needsRenewal(now, id.Leaf(), policy, dr)
		next := renewAt(id.Leaf(), policy, dr)
		r.mu.Lock()
		pending := r.pending
		if !r.retryAt.IsZero() && r.retryAt.After(next) {
			next = r.retryAt
			if due = !now.Before(next); due {
				why = "retry after a failed renewal"
			}
		}
		r.mu.Unlock()
		r.d.Status.NextRenewal(next)
		if p := pending; due && p != nil && now.Before(p.deadline) && p.id.Serial == id.Serial {
			// A request the hub accepted is still within its wait: its
			// answer may come on this connection; do not ask again yet,
			// unless it is overdue since a reconnect.
			r.mu.Lock()
			askAt := p.askAt
			r.mu.Unlock()
			switch {
			case !askAt.IsZero() && !now.Before(askAt):
				why = "no answer to the pending certificate request since the reconnect"
			case !askAt.IsZero() && askAt.Before(p.deadline):
				due, next = false, askAt
			default:
				due, next = false, p.deadline
			}
		}
		if !due {
			var ok bool
			if why, ok = r.wait(ctx, next); !ok {
				return
			}
			if why == "" {
				continue // re-evaluate with the clock
			}
		}
		r.log.Info("renewing the operational certificate", "reason", why, "serial", id.Serial, "not_after", id.NotAfter)
		err := r.renew(ctx, hub, id)
		if err == nil {
			r.d.Disk.Wrote()
			r.mu.Lock()
			r.failures, r.retryAt, r.hubUnanswered = 0, time.Time{}, 0
			r.mu.Unlock()
			r.d.EndSession()
			return
		}
		if ctx.Err() != nil {
			return
		}
		if errors.Is(err, errOwnRequestPending) {
			r.log.Info("waiting for the certificate request the hub is working on")
			continue // the pending deadline paces the loop
		}
		r.scheduleRetry(id, err)
	}
}

// wait waits until the clock reaches until, a renewal request (its reason
// is returned) or the end of ctx (false). While a file system is full (a renewal may have failed for
// want of space), it looks every diskCheckEvery whether space was freed,
// and then ends the wait with the retry time forgotten, so the renewal is
// retried at once instead of after the backoff.
func (r *Renewer) wait(ctx context.Context, until time.Time) (string, bool) {
	// The duration is taken from the clock as the timer is armed, not from
	// the loop's reading above: a clock stepped in between (NTP's first
	// sync, a test's fake clock) would otherwise arm the timer that much
	// too late, and the renewal would wait out the step again.
	timer, timerC := r.clock.NewTimer(until.Sub(r.clock.Now()))
	defer timer.Stop()
	var diskC <-chan time.Time
	if r.d.Disk.Full() {
		tick, c := r.clock.NewTicker(diskCheckEvery)
		defer tick.Stop()
		diskC = c
	}
	select {
	case <-ctx.Done():
		return "", false
	case why := <-r.now:
		return why, true
	case <-timerC:
	case <-diskC:
		if !r.d.Disk.Full() || r.d.Disk.RoomAgain() {
			r.mu.Lock()
			r.retryAt = time.Time{}
			r.mu.Unlock()
		}
	}
	return "", true
}

// scheduleRetry plans the next attempt after a failure: the retry policy
// (the hub's retry-after if it asked for longer), never later than a
// quarter of the remaining lifetime.
func (r *Renewer) scheduleRetry(id *provisioning.Identity, err error) {
	set := r.d.Settings()
	now := r.clock.Now()
	r.mu.Lock()
	r.failures++
	d := set.Retry.Wait(r.failures-1, err, nil)
	if limit := id.NotAfter.Sub(now) / 4; d > limit {
		d = max(limit, time.Second)
	}
	r.retryAt = now.Add(d)
	n := r.failures
	r.mu.Unlock()
	err = r.d.Disk.Advise(err) // then Run retries as soon as there is room
	r.d.Status.Raise(CondFailed, err.Error())
	r.log.Error("certificate renewal failed", "err", err, "attempt", n, "retry_in", d.Round(time.Second), "not_after", id.NotAfter)
}

// roomBytes and roomInodes are the free space and inodes a renewal needs in
// the state directory: a key file, a generation (directory, chain,
// identity.json), the "next" pointer and renewal-pending.json, with temp
// files.
const (
	roomBytes  = 64 << 10
	roomInodes = 16
)

// roomToRenew reports whether the file system of dir has room for a
// renewal. Asking the hub or DPS for a certificate that cannot be stored
// would only spend the issuance quota.
func roomToRenew(dir string) error {
	ok, err := diskspace.HasRoom(dir, roomBytes, roomInodes)
	if err != nil {
		return nil // let the writes themselves say what is wrong
	}
	if !ok {
		return &os.PathError{Op: "renew: no room for a new key and certificate in", Path: dir, Err: syscall.ENOSPC}
	}
	return nil
}

// renew obtains a new certificate and stages it, by the hub path or DPS.
// hub may be nil (no session): DPS then.
func (r *Renewer) renew(ctx context.Context, hub Hub, id *provisioning.Identity) error {
	set := r.d.Settings()
	if err := roomToRenew(set.StateDir); err != nil {
		return err
	}
	useHub := set.PreferHub && hub != nil && r.clock.Now().Before(id.NotAfter)
	if useHub && r.hubGivenUp(id) {
		r.log.Warn("the hub did not answer certificate requests; re-registering with DPS instead", "unanswered", r.unanswered())
	} else if useHub {
		err := r.viaHub(ctx, hub, id)
		if err == nil {
			return nil
		}
		if errors.Is(err, errOwnRequestPending) {
			if !r.pastHubFloor(id) {
				return err
			}
			r.log.Warn("the hub is still working on our certificate request, but too little lifetime is left to wait; re-registering with DPS", "err", err)
			return r.viaDPS(ctx)
		}
		if errors.Is(err, transport.ErrCredentialsUnanswered) {
			r.mu.Lock()
			r.hubUnanswered++
			r.mu.Unlock()
			if ctx.Err() != nil || !r.hubGivenUp(id) {
				return err // try the hub once more (next session or retry)
			}
			r.log.Warn("the hub did not answer certificate requests; re-registering with DPS instead", "err", err, "unanswered", r.unanswered())
			return r.viaDPS(ctx)
		}
		var ie *transport.IssueError
		hubBroken := retry.IsPermanent(err) || errors.As(err, &ie) && ie.Status >= 500 ||
			errors.Is(err, transport.ErrNoCertificateManagement)
		if !hubBroken {
			return err // transient (timeout, throttled, connection lost): retry the hub later
		}
		r.log.Warn("the hub's certificate API failed; falling back to re-registering with DPS", "err", err)
	}
	return r.viaDPS(ctx)
}

// viaDPS re-registers with the onboarding credential and stages the result.
func (r *Renewer) viaDPS(ctx context.Context) error {
	next, err := r.d.RegisterDPS(ctx)
	if err != nil {
		return fmt.Errorf("renewal via DPS: %w", err)
	}
	r.staged()
	r.log.Info("new certificate staged", "path", "dps", "serial", next.Serial, "not_after", next.NotAfter, "hub", next.AssignedHub)
	return nil
}

// newSlot creates the key for the next generation: in the free slot when
// rotating, else the current key.
func (r *Renewer) newSlot(ctx context.Context, id *provisioning.Identity) (*keystore.URI, crypto.Signer, error) {
	if !r.d.Settings().Rotate {
		u, err := keystore.Parse(id.KeyURI)
		if err != nil {
			return nil, nil, err
		}
		s, err := r.d.Keys.Signer(ctx, u)
		return u, s, err
	}
	slot, err := r.d.FreeSlot()
	if err != nil {
		return nil, nil, err
	}
	s, err := r.d.Keys.Fresh(ctx, slot)
	if err != nil {
		return nil, nil, fmt.Errorf("new operational key: %w", err)
	}
	r.step("renew-key-created")
	return slot, s, nil
}

// dropSlot deletes a new key that will not be used (unless it is the
// current one, when keys are not rotated).
func (r *Renewer) dropSlot(ctx context.Context, slot *keystore.URI) {
	if slot == nil || !r.d.Settings().Rotate {
		return
	}
	if err := r.d.Keys.Delete(context.WithoutCancel(ctx), slot); err != nil {
		r.log.Warn("could not delete an unused new key", "err", err)
	}
}

// Renew obtains a new certificate and stages it, through hub (nil: no
// session, DPS then) or DPS as configured, without the service running
// (`gwagent renew`); TrySwap then tries the new pair.
func (r *Renewer) Renew(ctx context.Context, hub Hub, id *provisioning.Identity) error {
	return r.renew(ctx, hub, id)
}
