package agent

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/gwagent/gwagent/agent/network"
	"github.com/gwagent/gwagent/agent/sdnotify"
	"github.com/gwagent/gwagent/internal/tlsconf"
	"github.com/gwagent/gwagent/keystore"
	"github.com/gwagent/gwagent/provisioning"
	"github.com/gwagent/gwagent/transport"
)

// dial opens a hub session with the identity's key and chain.
func (a *Agent) dial(ctx context.Context, id *provisioning.Identity) (*transport.Session, error) {
	cfg := a.cfg.Load()
	u, err := keystore.Parse(id.KeyURI)
	if err != nil {
		return nil, err
	}
	key, err := a.keys.Signer(ctx, u)
	if err != nil {
		return nil, &keyStoreError{fmt.Errorf("operational key: %w", err)}
	}
	a.keyOpened()
	signer := &watchedSigner{Signer: key}
	roots, err := tlsconf.LoadPool(cfg.TrustBundle)
	if err != nil {
		return nil, err
	}
	nw, err := network.Choose(cfg.Network, cfg.StateDir, a.clock.Now(), cfg.Network.HubWebSocketPort)
	if err != nil {
		return nil, fmt.Errorf("hub: %w", err)
	}
	dctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	sess, err := transport.Dial(dctx, transport.Config{
		Host:          id.AssignedHub,
		DeviceID:      id.DeviceID,
		APIVersion:    cfg.Hub.APIVersion,
		Roots:         roots,
		Signer:        signer,
		Chain:         id.Chain,
		KeepAlive:     cfg.Hub.KeepAlive.Duration,
		ClientVersion: "gwagent/" + a.opts.Version,
		OnDesired:     a.twin.OnDesired,
		OnMethod:      a.onMethod,
		OnCredentials: a.onCredentials,
		OnC2D: func(sys, app map[string]string, body []byte) {
			a.log.Info("cloud-to-device message", "id", sys["mid"], "bytes", len(body))
		},
		Network: nw.Options,
		Clock:   a.clock,
	})
	if err == nil || signer.signed() {
		a.status.Clear(CondKeyStoreUnavailable)
	}
	if err != nil {
		if serr := signer.failure(); serr != nil {
			// The signer's error arrives here as text (watchedSigner): the
			// cause is taken from the signer itself. The hub was reached;
			// the key store could not sign the handshake.
			return nil, &keyStoreError{fmt.Errorf("hub %s: %s: %w", id.AssignedHub, signingFailed, serr)}
		}
		return nil, err
	}
	used := sess.Transport()
	a.status.Update(true, func(s *Status) { s.Transport = string(used) })
	if nw.Worked(used, a.log) && a.hub.enter() {
		// Owned like the hub's callbacks: waited for before shutdown
		// completes, cancelled with the agent.
		go func() {
			defer a.hub.leave()
			nw.WatchMQTT(a.hub.context(), sess.Done(), id.AssignedHub, roots, a.clock, a.log, func() { a.hub.endSessionOf(sess) })
		}()
	}
	return sess, nil
}

// serve runs one connected session: report to the twin, drain the outbox,
// until the connection drops or ctx ends.
func (a *Agent) serve(ctx context.Context, sess *transport.Session, id *provisioning.Identity, wdC <-chan time.Time) {
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	defer a.hub.serving(sess, cancel)()
	// Everything started here ends before serve returns (and so before the
	// key stores close at shutdown).
	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Add(4)
	go func() {
		defer wg.Done()
		select {
		case <-sess.Done():
			cancel()
		case <-sctx.Done():
		}
	}()
	// While the hub refuses messages as over its daily quota, a twin or
	// certificate request would close the connection too: they wait for
	// the first acknowledged message (telemetry/quota.go).
	go func() {
		defer wg.Done()
		if a.pipe.HubTakes(sctx) {
			a.twin.Serve(sctx, sess, id)
		}
	}()
	go func() {
		defer wg.Done()
		if a.pipe.HubTakes(sctx) {
			a.renewal.Run(sctx, sess, id)
		}
	}()
	go func() { defer wg.Done(); a.pipe.Drain(sctx, sess) }()
	for {
		select {
		case <-sctx.Done():
			return
		case <-wdC:
			a.sd.Alive(sdnotify.StepBudget)
		}
	}
}
