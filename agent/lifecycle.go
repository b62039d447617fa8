package agent

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/gwagent/gwagent/agent/sdnotify"
	"github.com/gwagent/gwagent/agent/status"
	"github.com/gwagent/gwagent/internal/tlsconf"
	"github.com/gwagent/gwagent/keystore"
	"github.com/gwagent/gwagent/provisioning"
	"github.com/gwagent/gwagent/transport"
)

// lifecycle is the state machine: wait for a sane clock, make sure there is
// a valid identity (provisioning if not), connect, serve, reconnect.
func (a *Agent) lifecycle(ctx context.Context) {
	wd := a.sd.WatchdogInterval()
	var wdC <-chan time.Time
	if wd > 0 {
		t, c := a.clock.NewTicker(wd)
		defer t.Stop()
		wdC = c
	}
	failures := 0
	wait := func(d time.Duration) bool {
		a.sd.Alive(d + sdnotify.StepBudget) // a planned wait is progress
		timer, timerC := a.clock.NewTimer(d)
		defer timer.Stop()
		for {
			select {
			case <-ctx.Done():
				return false
			case <-wdC:
			case <-timerC:
				return true
			}
		}
	}
	for ctx.Err() == nil {
		a.sd.Alive(sdnotify.StepBudget)
		// Provisioning judges DPS's certificate and the issued chain: not
		// before the clock can be trusted (the floor is the build time here,
		// the certificate's notBefore below).
		if !a.clockSane(ctx, &provisioning.Identity{}, wait) {
			return
		}
		id, err := a.identity(ctx)
		if err != nil {
			failures++
			d := a.opts.Backoff.Wait(failures, err, a.rng)
			a.log.Error("no usable identity", "err", err, "retry_in", d.Round(time.Second))
			if !a.waitKeyDevice(err, d, wait) {
				return
			}
			continue
		}
		// Asked once per new identity: a restart declined now is not
		// made at some later reconnect.
		fresh := a.renewal.TakeStaged() || a.provisioned
		a.provisioned = false
		if fresh && a.opts.RestartWithNewIdentity != nil && a.opts.RestartWithNewIdentity() {
			a.restarting = true
			a.log.Info("new identity; restarting so that a fresh process connects with it", "device_id", id.DeviceID)
			return
		}
		if !a.clockSane(ctx, id, wait) {
			return
		}
		if a.clock.Now().After(id.NotAfter) {
			a.status.Raise(CondCertificateExpired, "certificate expired at "+id.NotAfter.Format(time.RFC3339))
			if a.cfg.Load().Static() {
				a.status.Set(status.Degraded)
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
		if d := a.quotaHold(); d > 0 {
			if !wait(d) {
				return
			}
			continue
		}
		if !a.cfg.Load().Static() {
			if sess, next := a.renewal.TrySwap(ctx); sess != nil {
				failures = 0
				a.renewal.Connected()
				a.status.Clear(CondHubUnreachable)
				a.status.Set(status.Connected)
				a.health.ReachedHub()
				if !a.connected(ctx, sess, next, wdC, wait) {
					return
				}
				continue
			}
		}
		if failures > 0 {
			a.status.Set(status.Reconnecting)
		} else {
			a.status.Set(status.Connecting)
		}
		sess, err := a.dial(ctx, id)
		if err != nil {
			failures++
			d := a.reconnectDelay(failures, err)
			if ke := (*keyStoreError)(nil); errors.As(err, &ke) {
				// The hub is not the problem: `gwagent status` must point
				// at the TPM or token. Cleared by the next signature.
				a.status.Raise(CondKeyStoreUnavailable, err.Error())
				a.status.Clear(CondHubUnreachable)
			} else {
				a.status.Raise(CondHubUnreachable, err.Error())
			}
			if a.renewal.Refused(err) && !a.cfg.Load().Static() {
				// The documented recovery: the hub no longer accepts this
				// identity (disabled, deleted, moved); register again,
				// within the bounds of the re-provisioning policy.
				if a.renewal.ReprovisionAfterRefusal(ctx, err) {
					continue
				}
			}
			if errors.Is(err, transport.ErrUnavailable) {
				a.status.Raise(CondThrottled, fmt.Sprintf("the hub answered CONNACK 3 (throttled at its connection-rate limit, or the device is disabled); retrying in %s", d.Round(time.Millisecond)))
			}
			a.log.Warn("hub connection failed", "err", err, "retry_in", d.Round(time.Millisecond))
			if !a.waitKeyDevice(err, d, wait) {
				return
			}
			continue
		}
		failures = 0
		a.renewal.Connected()
		a.renewal.RejectedThenConnected(ctx)
		a.status.Clear(CondHubUnreachable)
		a.status.Clear(CondReprovisionHeldBack)
		a.status.Clear(CondThrottled)
		a.status.Set(status.Connected)
		a.health.ReachedHub()
		if !a.connected(ctx, sess, id, wdC, wait) {
			return
		}
		failures = 1
	}
}

// reconnectCeiling caps the wait between attempts to reach the hub. The
// rule: exponential backoff from Backoff.Min (1 s), doubling per failure,
// capped at 8 s, each wait drawn at random between the floor and the cap
// (full jitter; retry.Policy.Wait, so a retry-after the hub may send one
// day is honoured too). A hub that is down sees one attempt per gateway every
// 4.5 s on average, spread out across a fleet; once it accepts connections
// again, the first message goes out within 8 s plus one connection.
// Provisioning and identity failures keep the long Backoff (up to 5 min).
const reconnectCeiling = 8 * time.Second

func (a *Agent) reconnectDelay(failures int, err error) time.Duration {
	p := a.opts.Backoff
	p.Max = min(p.Max, reconnectCeiling)
	return p.Wait(failures, err, a.rng)
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
	a.status.Set(status.Reconnecting)
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
		id := &provisioning.Identity{KeyURI: cfg.Operational.Key, DeviceID: cfg.Hub.DeviceID, AssignedHub: cfg.Hub.Host,
			Chain: chain, ChainPath: cfg.Hub.Chain, NotBefore: chain[0].NotBefore, NotAfter: chain[0].NotAfter,
			Serial: provisioning.FormatSerial(chain[0].SerialNumber), Via: "factory"}
		a.noteIdentity(id) // status and health show the certificate and its days left
		return id, nil
	}
	id, err := a.store.Current()
	if errors.Is(err, provisioning.ErrNotProvisioned) {
		a.status.Set(status.NotProvisioned)
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
	a.status.Set(status.Provisioning)
	a.renewal.NoteRegistration()
	cfg := a.cfg.Load()
	// Provision is bounded by provisioning_timeout, DPS's retry-afters
	// included: waiting for DPS is progress.
	a.sd.Alive(cfg.Identity.ProvisioningTimeout.Duration + sdnotify.StepBudget)
	id, err := Provision(ctx, cfg, a.keys, ProvisionOptions{
		Clock:         a.clock,
		ClientVersion: "gwagent/" + a.opts.Version,
		Progress:      func(s string) { a.log.Info("provisioning", "step", s) },
		OnStep: func(s provisioning.Step) {
			if s.Kind == provisioning.StepConnecting {
				a.keyStoreWorks()
			}
			a.onProvisionStep(s)
		},
	})
	a.status.Clear(CondThrottled)
	switch {
	case err == nil:
		a.status.Clear(CondOnboardingRejected)
		a.status.Clear(CondProvisioningFailed)
		a.status.Clear(CondKeyStoreUnavailable)
		a.wroteAgain()
		a.provisioned = true
		a.log.Info("provisioned", "device_id", id.DeviceID, "hub", id.AssignedHub, "serial", id.Serial, "not_after", id.NotAfter)
		a.noteIdentity(id)
		return id, nil
	case errors.Is(err, provisioning.ErrCredentialRejected):
		a.status.Raise(CondOnboardingRejected, err.Error())
	case errors.As(err, new(*keyStoreError)),
		errors.Is(err, keystore.ErrDeviceAbsent), errors.Is(err, keystore.ErrDeviceBusy), errors.Is(err, keystore.ErrBadPIN),
		errors.Is(err, keystore.ErrTokenAbsent), errors.Is(err, keystore.ErrUnsupportedCurve):
		a.status.Raise(CondKeyStoreUnavailable, err.Error())
	default:
		a.noteFullDisk(err)
		a.status.Raise(CondProvisioningFailed, err.Error())
	}
	a.status.Set(status.Degraded)
	a.log.Error("provisioning failed", "err", err)
	return nil, err
}

// clockSane waits while the clock is before the build time or before the
// certificate's notBefore (a gateway without RTC boots in 1970): TLS and
// renewal decisions are meaningless until time is synchronised. Past that
// floor it also waits, for a while after boot, for NTP to vouch for the
// clock when no real-time clock does (clockTrusted).
func (a *Agent) clockSane(ctx context.Context, id *provisioning.Identity, wait func(time.Duration) bool) bool {
	for {
		now := a.clock.Now()
		floor := a.opts.BuildTime
		if nb := id.NotBefore.Add(-5 * time.Minute); nb.After(floor) {
			floor = nb
		}
		if !now.Before(floor) {
			why, ok := a.clockTrusted(now)
			if ok {
				a.status.Clear(CondClockNotSynced)
				return true
			}
			a.status.Raise(CondClockNotSynced, why)
			a.status.Set(status.WaitingForClock)
			if !wait(a.opts.ClockPoll) {
				return false
			}
			continue
		}
		a.status.Raise(CondClockNotSynced, fmt.Sprintf("clock says %s, before %s; waiting for time synchronisation (NTP)", now.UTC().Format(time.RFC3339), floor.UTC().Format(time.RFC3339)))
		a.status.Set(status.WaitingForClock)
		if !wait(a.opts.ClockPoll) {
			return false
		}
	}
}
