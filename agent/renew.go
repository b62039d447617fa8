package agent

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/gwagent/gwagent/internal/atomicfile"
	"github.com/gwagent/gwagent/internal/backoff"
	"github.com/gwagent/gwagent/internal/diskspace"
	"github.com/gwagent/gwagent/internal/tlsconf"
	"github.com/gwagent/gwagent/keystore"
	"github.com/gwagent/gwagent/provisioning"
	"github.com/gwagent/gwagent/transport"
)

// Renewal, as a sequence of named steps (the crash tests stop the agent at
// each one, see crashEnv):
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

// crashEnv names a step at which the agent kills itself (tests only).
const crashEnv = "GWAGENT_TEST_CRASH_AT"

func (a *Agent) step(name string) {
	if a.crashAt != "" && a.crashAt == name {
		a.log.Warn("test hook: killing the agent", "step", name)
		syscall.Kill(os.Getpid(), syscall.SIGKILL)
		select {} // SIGKILL is not deliverable to ourselves late; wait for it
	}
}

// renewalSeed is this device's persisted random seed: with a certificate's
// serial it gives the certificate's jitter draw, the same after every
// restart, different on every device.
func (a *Agent) renewalSeed() []byte {
	path := filepath.Join(a.cfg.Load().StateDir, "renewal-seed")
	if b, err := os.ReadFile(path); err == nil && len(b) == 32 {
		return b
	}
	seed := make([]byte, 32)
	rand.Read(seed)
	if err := atomicfile.Write(path, seed, 0o600); err != nil {
		a.log.Warn("cannot persist the renewal seed; the jitter will be drawn again after a restart", "err", err)
	}
	return seed
}

// renewalDraw is the jitter draw in [0, 1) for the certificate with serial.
func renewalDraw(seed []byte, serial string) float64 {
	h := sha256.Sum256(append(append([]byte{}, seed...), serial...))
	return float64(binary.BigEndian.Uint64(h[:8])>>11) / (1 << 53)
}

// RequestRenewal asks the running agent to renew now (direct method,
// SIGHUP, `gwagent renew`). It does not wait.
func (a *Agent) RequestRenewal(why string) {
	select {
	case a.renewNow <- why:
	default: // one request is already queued
	}
}

// renewLoop waits for the planned renewal time (or a request) while the
// session is up, and renews. On success it ends the session so the
// lifecycle swaps to the staged identity.
func (a *Agent) renewLoop(ctx context.Context, sess *transport.Session, id *provisioning.Identity, endSession func()) {
	cfg := a.cfg.Load()
	if cfg.Static() {
		return // a factory certificate is renewed by the factory's process
	}
	policy := cfg.Renewal.Policy()
	draw := renewalDraw(a.seed, id.Serial)
	a.mu.Lock()
	p := a.pending
	a.mu.Unlock()
	if p == nil {
		a.loadPending(ctx, id)
		a.mu.Lock()
		p = a.pending
		a.mu.Unlock()
	}
	if p != nil && p.id.Serial == id.Serial {
		// The answer to a request the hub accepted before the reconnect
		// comes on the credentials topic, subscribed only while renewing.
		if err := sess.WatchCredentials(ctx); err != nil {
			a.log.Warn("cannot wait for the pending certificate answer on this connection", "err", err)
		}
	}
	for ctx.Err() == nil {
		now := a.opts.Now()
		due, why := needsRenewal(now, id.Leaf(), policy, draw)
		next := renewAt(id.Leaf(), policy, draw)
		a.mu.Lock()
		pending := a.pending
		if !a.retryAt.IsZero() && a.retryAt.After(next) {
			next = a.retryAt
			if due = !now.Before(next); due {
				why = "retry after a failed renewal"
			}
		}
		a.mu.Unlock()
		a.status.Update(true, func(s *Status) { s.NextRenewal = next })
		if p := pending; due && p != nil && now.Before(p.deadline) && p.id.Serial == id.Serial {
			// A request the hub accepted is still within its wait: its
			// answer may come on this connection; do not ask again yet.
			due, next = false, p.deadline
		}
		if !due {
			timer := time.NewTimer(next.Sub(now))
			// While a file system is full (a renewal may have failed for
			// want of space), look every diskCheckEvery whether space was
			// freed, and then retry at once instead of after the backoff.
			var diskC <-chan time.Time
			stop := timer.Stop
			if a.diskFull() {
				tick := time.NewTicker(diskCheckEvery)
				diskC = tick.C
				stop = func() bool { tick.Stop(); return timer.Stop() }
			}
			select {
			case <-ctx.Done():
				stop()
				return
			case why = <-a.renewNow:
				stop()
			case <-timer.C:
				stop()
				continue // re-evaluate with the clock
			case <-diskC:
				stop()
				if !a.diskFull() || a.roomAgain() {
					a.mu.Lock()
					a.retryAt = time.Time{}
					a.mu.Unlock()
				}
				continue
			}
		}
		a.log.Info("renewing the operational certificate", "reason", why, "serial", id.Serial, "not_after", id.NotAfter)
		err := a.renew(ctx, sess, id)
		if err == nil {
			a.wroteAgain()
			a.mu.Lock()
			a.renewFailures, a.retryAt, a.hubUnanswered = 0, time.Time{}, 0
			a.mu.Unlock()
			endSession()
			return
		}
		if ctx.Err() != nil {
			return
		}
		if errors.Is(err, errOwnRequestPending) {
			a.log.Info("waiting for the certificate request the hub is working on")
			continue // the pending deadline paces the loop
		}
		a.scheduleRetry(id, err)
	}
}

// scheduleRetry plans the next attempt after a failure: exponential backoff
// with jitter, never later than a quarter of the remaining lifetime.
func (a *Agent) scheduleRetry(id *provisioning.Identity, err error) {
	cfg := a.cfg.Load()
	now := a.opts.Now()
	a.mu.Lock()
	a.renewFailures++
	d := backoff.Policy{Min: cfg.Renewal.RetryMin.Duration, Max: cfg.Renewal.RetryMax.Duration}.Delay(a.renewFailures-1, nil)
	var ie *transport.IssueError
	if errors.As(err, &ie) && ie.RetryAfter > d {
		d = ie.RetryAfter
	}
	if limit := id.NotAfter.Sub(now) / 4; d > limit {
		d = max(limit, time.Second)
	}
	a.retryAt = now.Add(d)
	n := a.renewFailures
	a.mu.Unlock()
	err = spaceAdvice(cfg, err)
	a.noteFullDisk(err) // then renewLoop retries as soon as there is room
	a.status.Raise(CondRenewalFailed, err.Error())
	a.log.Error("certificate renewal failed", "err", err, "attempt", n, "retry_in", d.Round(time.Second), "not_after", id.NotAfter)
}

// hubUnansweredLimit and hubUnansweredFloor are the rule for a hub that
// does not answer certificate requests at all (no 202: silent, or the
// connection drops on the request): the hub path is abandoned for DPS
// re-registration after two such attempts in a row, or after one once less
// than a quarter of the certificate's lifetime remains, so that DPS still
// has that quarter (retries included) before the certificate expires. A
// hub that answered 202 is waited for instead (issuance can take long).
const (
	hubUnansweredLimit = 2
	hubUnansweredFloor = 0.25
)

// hubFloor is when less than hubUnansweredFloor of id's lifetime remains:
// waits for the hub end there, leaving the rest to DPS.
func hubFloor(id *provisioning.Identity) time.Time {
	return id.NotAfter.Add(-time.Duration(hubUnansweredFloor * float64(id.NotAfter.Sub(id.NotBefore))))
}

func (a *Agent) pastHubFloor(id *provisioning.Identity) bool {
	return !a.opts.Now().Before(hubFloor(id))
}

// hubGivenUp applies that rule.
func (a *Agent) hubGivenUp(id *provisioning.Identity) bool {
	a.mu.Lock()
	n := a.hubUnanswered
	a.mu.Unlock()
	life := id.NotAfter.Sub(id.NotBefore)
	left := id.NotAfter.Sub(a.opts.Now())
	return n >= hubUnansweredLimit || (n >= 1 && life > 0 && float64(left) < hubUnansweredFloor*float64(life))
}

// renewRoom is the free space and inodes a renewal needs in the state
// directory: a key file, a generation (directory, chain, identity.json),
// the "next" pointer and renewal-pending.json, with temp files.
const (
	renewRoomBytes  = 64 << 10
	renewRoomInodes = 16
)

// roomToRenew reports whether the file system of dir has room for a
// renewal. Asking the hub or DPS for a certificate that cannot be stored
// would only spend the issuance quota.
func roomToRenew(dir string) error {
	ok, err := diskspace.HasRoom(dir, renewRoomBytes, renewRoomInodes)
	if err != nil {
		return nil // let the writes themselves say what is wrong
	}
	if !ok {
		return &os.PathError{Op: "renew: no room for a new key and certificate in", Path: dir, Err: syscall.ENOSPC}
	}
	return nil
}

// renew obtains a new certificate and stages it, by the hub path or DPS.
func (a *Agent) renew(ctx context.Context, sess *transport.Session, id *provisioning.Identity) error {
	cfg := a.cfg.Load()
	if err := roomToRenew(cfg.StateDir); err != nil {
		return err
	}
	if cfg.Renewal.Prefer == "hub" && sess != nil && a.opts.Now().Before(id.NotAfter) && a.hubGivenUp(id) {
		a.log.Warn("the hub did not answer certificate requests; re-registering with DPS instead", "unanswered", a.hubUnansweredCount())
	} else if cfg.Renewal.Prefer == "hub" && sess != nil && a.opts.Now().Before(id.NotAfter) {
		err := a.renewViaHub(ctx, sess, id)
		if err == nil {
			return nil
		}
		if errors.Is(err, errOwnRequestPending) {
			if !a.pastHubFloor(id) {
				return err
			}
			a.log.Warn("the hub is still working on our certificate request, but too little lifetime is left to wait; re-registering with DPS", "err", err)
			return a.renewViaDPS(ctx, id)
		}
		if errors.Is(err, transport.ErrCredentialsUnanswered) {
			a.mu.Lock()
			a.hubUnanswered++
			a.mu.Unlock()
			if ctx.Err() != nil || !a.hubGivenUp(id) {
				return err // try the hub once more (next session or retry)
			}
			a.log.Warn("the hub did not answer certificate requests; re-registering with DPS instead", "err", err, "unanswered", a.hubUnansweredCount())
			return a.renewViaDPS(ctx, id)
		}
		var ie *transport.IssueError
		hubBroken := errors.As(err, &ie) && (ie.Permanent() || ie.Status >= 500) ||
			errors.Is(err, transport.ErrNoCertificateManagement)
		if !hubBroken {
			return err // transient (timeout, throttled, connection lost): retry the hub later
		}
		a.log.Warn("the hub's certificate API failed; falling back to re-registering with DPS", "err", err)
	}
	return a.renewViaDPS(ctx, id)
}

func (a *Agent) hubUnansweredCount() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.hubUnanswered
}

// newSlot creates the key for the next generation: in the free slot when
// rotating, else the current key.
func (a *Agent) newSlot(ctx context.Context, id *provisioning.Identity) (*keystore.URI, crypto.Signer, error) {
	cfg := a.cfg.Load()
	if !cfg.Renewal.Rotate() {
		u, err := keystore.Parse(id.KeyURI)
		if err != nil {
			return nil, nil, err
		}
		s, err := a.keys.Signer(ctx, u)
		return u, s, err
	}
	slot, err := freeSlot(cfg, a.store)
	if err != nil {
		return nil, nil, err
	}
	s, err := a.keys.Fresh(ctx, slot)
	if err != nil {
		return nil, nil, fmt.Errorf("new operational key: %w", err)
	}
	a.step("renew-key-created")
	return slot, s, nil
}

// dropSlot deletes a new key that will not be used (unless it is the
// current one, when keys are not rotated).
func (a *Agent) dropSlot(ctx context.Context, slot *keystore.URI, id *provisioning.Identity) {
	if slot == nil || !a.cfg.Load().Renewal.Rotate() {
		return
	}
	if err := a.keys.Delete(context.WithoutCancel(ctx), slot); err != nil {
		a.log.Warn("could not delete an unused new key", "err", err)
	}
}

// renewViaHub runs the hub's certificate-signing API (azure-protocol §2.5).
// After the 202 it waits until the operationExpires the hub gave (issuance
// can take hours), but not past hubFloor. It never replaces its own request
// while the hub still works on it (a 409 naming it): only a request it does
// not know (lost with a key from before a crash) is replaced.
func (a *Agent) renewViaHub(ctx context.Context, sess *transport.Session, id *provisioning.Identity) error {
	cfg := a.cfg.Load()
	now := a.opts.Now()
	a.mu.Lock()
	prev := a.pending
	a.mu.Unlock()
	if prev != nil && prev.id.Serial == id.Serial && now.Before(prev.deadline) {
		return errOwnRequestPending
	}
	slot, signer, err := a.newSlot(ctx, id)
	if err != nil {
		return err
	}
	der, err := provisioning.CSR(signer, id.DeviceID)
	if err != nil {
		a.dropSlot(ctx, slot, id)
		return err
	}
	p := &pendingIssue{slot: slot, signer: signer, id: id}
	a.setPending(p)
	replace := ""
	for attempt := 1; ; attempt++ {
		rid := fmt.Sprintf("gwrenew%dx%d", a.opts.Now().Unix(), attempt)
		a.mu.Lock()
		p.rid = rid
		a.mu.Unlock()
		certs, err := sess.IssueCertificate(ctx, transport.IssueRequest{RID: rid, CSR: der, Replace: replace,
			// The SDKs wait 90 s for the 202; never longer than for the
			// certificate itself.
			AcceptTimeout: min(90*time.Second, cfg.Renewal.IssueTimeout.Duration),
			AnswerWait:    cfg.Renewal.IssueTimeout.Duration,
			Latest:        hubFloor(id),
			Accepted: func(rid, corr string, until time.Time) {
				a.mu.Lock()
				p.deadline = until
				a.mu.Unlock()
				a.setPending(p)
				a.log.Info("the hub accepted the certificate request", "rid", rid, "correlation_id", corr, "wait_until", until)
			}})
		var ie *transport.IssueError
		switch {
		case err == nil:
			return a.finishHubIssue(ctx, p, certs)
		case errors.As(err, &ie) && ie.Status == 409 && prev != nil && ie.ActiveRID == prev.rid && a.opts.Now().Before(ie.ActiveExpires):
			// Our own earlier request is still being worked on: wait for
			// it, never cancel it with "replace".
			a.clearPending(p)
			a.dropSlot(ctx, slot, id)
			prev.deadline = ie.ActiveExpires
			if f := hubFloor(id); f.Before(prev.deadline) {
				prev.deadline = f
			}
			a.setPending(prev)
			a.log.Info("the hub is still working on our earlier certificate request; waiting for it", "rid", prev.rid, "until", prev.deadline)
			return errOwnRequestPending
		case errors.As(err, &ie) && ie.Status == 409 && replace == "" && attempt < 3:
			// A request we do not know (its key was lost with a crash
			// before it was recorded): replace it with this one.
			replace = ie.ActiveRID
			if replace == "" {
				replace = "*"
			}
			a.log.Info("a certificate request we do not know was in flight; replacing it", "active_rid", ie.ActiveRID)
			continue
		case errors.As(err, &ie) && ie.Status == 429 && attempt < 3:
			d := min(max(ie.RetryAfter, time.Second), 5*time.Minute)
			a.log.Info("the hub throttled the certificate request", "retry_in", d)
			select {
			case <-ctx.Done():
			case <-time.After(d):
				continue
			}
		}
		if !errors.As(err, &ie) && !errors.Is(err, transport.ErrCredentialsUnanswered) {
			// The hub accepted the request (202) but its answer did not
			// come on this connection: it may still come later
			// (OnCredentials), so the new key is kept until then.
			return fmt.Errorf("hub certificate request %s: %w", rid, err)
		}
		a.clearPending(p)
		a.dropSlot(ctx, slot, id)
		return err
	}
}

// pendingIssue is a hub certificate request whose answer may arrive after a
// reconnect.
type pendingIssue struct {
	slot   *keystore.URI
	signer crypto.Signer
	id     *provisioning.Identity
	// rid and deadline (the end of the wait for the answer after the 202)
	// are set under Agent.mu.
	rid      string
	deadline time.Time
}

// onCredentials takes a certificate answer that arrived with nobody waiting
// (the 200 after a reconnect).
func (a *Agent) onCredentials(status int, rid string, body []byte) {
	if !a.calls.enter() {
		return
	}
	defer a.calls.leave()
	a.mu.Lock()
	p := a.pending
	if p == nil || p.rid != rid {
		a.mu.Unlock()
		a.log.Info("ignoring a certificate answer for an unknown request", "rid", rid, "status", status)
		return
	}
	a.pending = nil
	a.mu.Unlock()
	a.removePendingRecord()
	ctx := a.callbackCtx()
	certs, err := transport.ParseIssueAnswer(status, body, 0)
	if err == nil {
		err = a.finishHubIssue(ctx, p, certs)
	}
	if err != nil {
		a.dropSlot(ctx, p.slot, p.id)
		a.scheduleRetry(p.id, err)
		return
	}
	a.log.Info("the certificate arrived after a reconnect", "rid", rid)
	a.mu.Lock()
	a.renewFailures, a.retryAt = 0, time.Time{}
	a.mu.Unlock()
	a.endSession()
}

// finishHubIssue validates and stages a chain from the hub.
func (a *Agent) finishHubIssue(ctx context.Context, p *pendingIssue, certs []string) error {
	a.clearPending(p)
	chain, err := provisioning.DecodeChain(certs)
	if err == nil {
		err = provisioning.ValidateChain(chain, p.signer.Public(), p.id.DeviceID, a.opts.Now(), nil)
	}
	if err != nil {
		a.dropSlot(ctx, p.slot, p.id)
		return fmt.Errorf("certificate from the hub: %w", err)
	}
	next, err := a.store.Stage(&provisioning.Identity{
		KeyURI: p.slot.Secret(), RegistrationID: p.id.RegistrationID, DeviceID: p.id.DeviceID,
		AssignedHub: p.id.AssignedHub, IssuedAt: a.opts.Now().UTC(), Via: "hub",
	}, chain)
	if err != nil {
		a.dropSlot(ctx, p.slot, p.id)
		return err
	}
	a.step("renew-staged")
	a.log.Info("new certificate staged", "path", "hub", "serial", next.Serial, "not_after", next.NotAfter)
	return nil
}

// renewViaDPS re-registers with the onboarding credential and stages the
// result.
func (a *Agent) renewViaDPS(ctx context.Context, id *provisioning.Identity) error {
	cfg := a.cfg.Load()
	next, err := Provision(ctx, cfg, a.keys, ProvisionOptions{
		Now: a.opts.Now, RetryAfterMin: a.opts.RetryAfterMin, ClientVersion: "gwagent/" + a.opts.Version,
		Stage:    true,
		Progress: func(s string) { a.log.Info("renewal via DPS", "step", s) },
	})
	if err != nil {
		return fmt.Errorf("renewal via DPS: %w", err)
	}
	a.step("renew-staged")
	a.log.Info("new certificate staged", "path", "dps", "serial", next.Serial, "not_after", next.NotAfter, "hub", next.AssignedHub)
	return nil
}

// trySwap connects with a staged identity, if there is one. If the hub
// accepts it, it is committed and the previous key deleted, and the session
// is returned. If the hub refuses the new pair, it is rolled back (the
// staged generation and its key are dropped). A failure that says nothing
// about the pair (hub unreachable) keeps it staged for the next try.
func (a *Agent) trySwap(ctx context.Context) (*transport.Session, *provisioning.Identity) {
	next, err := a.store.Next()
	if err != nil {
		if !errors.Is(err, provisioning.ErrNotProvisioned) {
			a.log.Warn("unreadable staged identity; dropping it", "err", err)
			a.store.Discard()
		}
		return nil, nil
	}
	a.status.Set(StateSwapping)
	sess, err := a.dial(ctx, next)
	if err != nil {
		// A TLS alert about the new certificate is a refusal too, from the
		// second in a row, or once the current pair got through right
		// after it (swapRejectedThenConnected): a single alert alone may
		// come from a middlebox.
		rejected := tlsconf.RejectedIdentity(err)
		refused := errors.Is(err, transport.ErrUnauthorized) || errors.Is(err, keystore.ErrKeyNotFound) ||
			a.opts.Now().After(next.NotAfter) || (rejected && a.swapRejections >= 1)
		if rejected {
			a.swapRejections++
		} else {
			a.swapRejections = 0
		}
		a.swapFailures++
		if !refused && a.swapFailures < 3 {
			a.log.Warn("could not try the new certificate yet; keeping it staged", "err", err)
			return nil, nil
		}
		a.log.Error("the hub refused the new certificate; rolling back to the current one", "err", err, "serial", next.Serial)
		a.rollback(ctx, next)
		return nil, nil
	}
	a.swapFailures, a.swapRejections = 0, 0
	a.step("swap-connected")
	prev, err := a.store.Commit()
	if err != nil {
		a.log.Error("could not commit the new identity; staying on it for this session", "err", err)
		return sess, next
	}
	a.step("swap-committed")
	a.status.Clear(CondRenewalFailed)
	if prev != nil && prev.KeyURI != next.KeyURI {
		if u, perr := keystore.Parse(prev.KeyURI); perr == nil {
			if derr := a.keys.Delete(ctx, u); derr != nil {
				a.log.Warn("could not delete the previous key", "err", derr)
			}
		}
	}
	a.step("swap-old-key-gone")
	if err := a.store.Prune(); err != nil {
		a.log.Warn("identity store cleanup", "err", err)
	}
	from := ""
	if prev != nil {
		from = prev.Serial
	}
	a.log.Info("certificate renewed and in use", "serial", next.Serial, "previous_serial", from, "not_after", next.NotAfter, "via", next.Via)
	a.noteIdentity(next)
	return sess, next
}

// swapRejectedThenConnected is called when the hub accepted the current
// pair: if the staged one was just rejected in the TLS handshake, on the
// same path, the alert was about the new certificate, so it is rolled back.
func (a *Agent) swapRejectedThenConnected(ctx context.Context) {
	if a.swapRejections == 0 {
		return
	}
	next, err := a.store.Next()
	if err != nil {
		a.swapRejections = 0
		return
	}
	a.log.Error("the hub rejected the new certificate in the TLS handshake and accepted the current one; rolling back", "serial", next.Serial)
	a.rollback(ctx, next)
}

// rollback drops a staged identity and its key (unless it is the current
// key), keeping the current identity.
func (a *Agent) rollback(ctx context.Context, next *provisioning.Identity) {
	cur, _ := a.store.Current()
	if err := a.store.Discard(); err != nil {
		a.log.Error("rollback", "err", err)
		return
	}
	a.swapFailures, a.swapRejections = 0, 0
	if cur == nil || cur.KeyURI != next.KeyURI {
		if u, err := keystore.Parse(next.KeyURI); err == nil {
			if err := a.keys.Delete(context.WithoutCancel(ctx), u); err != nil {
				a.log.Warn("rollback: could not delete the new key", "err", err)
			}
		}
	}
	if cur != nil {
		a.scheduleRetry(cur, errors.New("the hub refused the renewed certificate"))
	}
}

// endSession ends the current hub session so the lifecycle swaps to the
// staged identity.
func (a *Agent) endSession() {
	a.mu.Lock()
	end := a.endSess
	a.mu.Unlock()
	if end != nil {
		end()
	}
}

// RenewOnce renews the certificate without the service running (`gwagent
// renew`): connect with the current identity, renew (hub path or DPS as
// configured), connect with the new pair and commit it.
func (a *Agent) RenewOnce(ctx context.Context) (*provisioning.Identity, error) {
	cfg := a.cfg.Load()
	if cfg.Static() {
		return nil, errors.New("renew: this device uses a factory certificate ([hub] static mode); renew it with the factory's process")
	}
	a.started = a.opts.Now()
	a.status = newStatusTracker(cfg.StateDir, a.log, a.notify, a.opts.Now, a.opts.Version)
	defer a.status.Set(StateStopped) // not "swapping-certificate" for ever: no agent runs
	defer a.keys.Close()
	store, err := provisioning.OpenStore(cfg.StateDir)
	if err != nil {
		return nil, err
	}
	a.store = store
	a.seed = a.renewalSeed()
	id, err := store.Current()
	if err != nil {
		return nil, fmt.Errorf("renew: %w; run `gwagent provision` first", err)
	}
	var sess *transport.Session
	if a.opts.Now().Before(id.NotAfter) && cfg.Renewal.Prefer == "hub" {
		if sess, err = a.dial(ctx, id); err != nil {
			a.log.Warn("cannot reach the hub with the current certificate; using DPS", "err", err)
		}
	}
	err = a.renew(ctx, sess, id)
	if sess != nil {
		sess.Close()
	}
	if err != nil {
		return nil, spaceAdvice(cfg, err)
	}
	for range 3 {
		if s, next := a.trySwap(ctx); s != nil {
			s.Close()
			return next, nil
		}
		if _, err := store.Next(); err != nil {
			break // rolled back
		}
	}
	return nil, errors.New("renew: the hub did not accept the new certificate; the current one stays in use")
}
