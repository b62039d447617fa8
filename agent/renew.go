package agent

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/gwagent/gwagent/agent/status"
	"github.com/gwagent/gwagent/internal/condition"
	"github.com/gwagent/gwagent/internal/retry"
	"github.com/gwagent/gwagent/keystore"
	"github.com/gwagent/gwagent/provisioning"
	"github.com/gwagent/gwagent/renewal"
	"github.com/gwagent/gwagent/transport"
)

// The agent's side of renewal (the renewal package does the work): what it
// hands the Renewer, and the entry points of the CLI and direct methods.

// Conditions raised by renewal, named here like the others.
const (
	CondRenewalFailed       = renewal.CondFailed
	CondReprovisionHeldBack = renewal.CondReprovisionHeldBack
)

// ReprovisionPolicy bounds re-registrations after the hub refused the
// identity (renewal.ReprovisionPolicy).
type ReprovisionPolicy = renewal.ReprovisionPolicy

// newRenewer prepares the agent's Renewer; its store is given by Start.
func (a *Agent) newRenewer(crashAt string) *renewal.Renewer {
	return renewal.New(renewal.Deps{
		Log:      a.log,
		Clock:    a.clock,
		Status:   renewalStatus{a},
		Disk:     renewalDisk{a},
		Keys:     a.keys,
		Settings: a.renewalSettings,
		FreeSlot: func() (*keystore.URI, error) { return freeSlot(a.cfg.Load(), a.store) },
		RegisterDPS: func(ctx context.Context) (*provisioning.Identity, error) {
			return Provision(ctx, a.cfg.Load(), a.keys, ProvisionOptions{
				Clock: a.clock, ClientVersion: "gwagent/" + a.opts.Version, Stage: true,
				Progress: func(s string) { a.log.Info("renewal via DPS", "step", s) },
			})
		},
		Reprovision:    func(ctx context.Context) error { _, err := a.provision(ctx); return err },
		Dial:           a.dial,
		EndSession:     a.hub.endSession,
		Reprovisioning: a.opts.Reprovision,
		CrashAt:        crashAt,
	})
}

func (a *Agent) renewalSettings() renewal.Settings {
	cfg := a.cfg.Load()
	r := cfg.Renewal
	return renewal.Settings{
		StateDir: cfg.StateDir, Static: cfg.Static(), Policy: r.Policy(),
		Retry:     retry.Policy{Min: r.RetryMin.Duration, Max: r.RetryMax.Duration},
		PreferHub: r.Prefer == "hub", IssueTimeout: r.IssueTimeout.Duration, Rotate: r.Rotate(),
	}
}

// renewalStatus is the status tracker as renewal sees it.
type renewalStatus struct{ a *Agent }

func (s renewalStatus) Raise(c condition.Name, reason string) { s.a.status.Raise(c, reason) }
func (s renewalStatus) Clear(c condition.Name)                { s.a.status.Clear(c) }
func (s renewalStatus) Has(c condition.Name) bool             { return s.a.status.Has(c) }
func (s renewalStatus) Swapping()                             { s.a.status.Set(status.Swapping) }
func (s renewalStatus) InUse(id *provisioning.Identity)       { s.a.noteIdentity(id) }
func (s renewalStatus) NextRenewal(at time.Time) {
	s.a.status.Update(true, func(st *Status) { st.NextRenewal = at })
}

// renewalDisk is the full-disk bookkeeping (diskfull.go) as renewal sees it.
type renewalDisk struct{ a *Agent }

func (d renewalDisk) Full() bool      { return d.a.diskFull() }
func (d renewalDisk) RoomAgain() bool { return d.a.roomAgain() }
func (d renewalDisk) Wrote()          { d.a.wroteAgain() }
func (d renewalDisk) Advise(err error) error {
	err = spaceAdvice(d.a.cfg.Load(), err)
	d.a.noteFullDisk(err)
	return err
}

// RequestRenewal asks the running agent to renew now (direct method,
// SIGHUP, `gwagent renew`). It does not wait.
func (a *Agent) RequestRenewal(why string) { a.renewal.Request(why) }

// RenewOnce renews the certificate without the service running (`gwagent
// renew`): connect with the current identity, renew (hub path or DPS as
// configured), connect with the new pair and commit it.
func (a *Agent) RenewOnce(ctx context.Context) (*provisioning.Identity, error) {
	cfg := a.cfg.Load()
	if cfg.Static() {
		return nil, errors.New("renew: this device uses a factory certificate ([hub] static mode); renew it with the factory's process")
	}
	defer a.status.Set(status.Stopped) // not "swapping-certificate" for ever: no agent runs
	defer a.keys.Close()
	store, err := provisioning.OpenStore(cfg.StateDir)
	if err != nil {
		return nil, err
	}
	a.store = store
	a.renewal.Start(store)
	id, err := store.Current()
	if err != nil {
		return nil, fmt.Errorf("renew: %w; run `gwagent provision` first", err)
	}
	var hub renewal.Hub // nil: DPS
	var sess *transport.Session
	if a.clock.Now().Before(id.NotAfter) && cfg.Renewal.Prefer == "hub" {
		if sess, err = a.dial(ctx, id); err != nil {
			a.log.Warn("cannot reach the hub with the current certificate; using DPS", "err", err)
		} else {
			hub = sess
		}
	}
	err = a.renewal.Renew(ctx, hub, id)
	if sess != nil {
		sess.Close()
	}
	if err != nil {
		return nil, spaceAdvice(cfg, err)
	}
	for range 3 {
		if s, next := a.renewal.TrySwap(ctx); s != nil {
			s.Close()
			return next, nil
		}
		if _, err := store.Next(); err != nil {
			break // rolled back
		}
	}
	return nil, errors.New("renew: the hub did not accept the new certificate; the current one stays in use")
}
