package agent

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gwagent/gwagent/internal/mqttconn"
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
	now := a.opts.Now()
	nw, probe, err := networkOptions(cfg, now, cfg.Network.HubWebSocketPort)
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
		OnDesired:     a.onDesired,
		OnMethod:      a.onMethod,
		OnCredentials: a.onCredentials,
		OnC2D: func(sys, app map[string]string, body []byte) {
			a.log.Info("cloud-to-device message", "id", sys["mid"], "bytes", len(body))
		},
		Network: nw,
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
	if err := rememberTransport(cfg, now, used, probe); err != nil {
		a.log.Warn("cannot remember the transport that worked", "err", err)
	}
	if probe || used != nw.Prefer && nw.Transport == mqttconn.Auto {
		a.log.Info("transport chosen", "transport", string(used), "tried_first", string(nw.Prefer))
	}
	a.status.Update(true, func(s *Status) { s.Transport = string(used) })
	if nw.Transport == mqttconn.Auto && used == mqttconn.WebSocket {
		// Owned like the hub's callbacks: waited for before shutdown
		// completes, cancelled with the agent.
		if a.calls.enter() {
			go func() { defer a.calls.leave(); a.watchMQTT(a.callbackCtx(), sess, cfg, id.AssignedHub, roots, nw) }()
		}
	}
	return sess, nil
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
	go func() { defer wg.Done(); a.syncTwin(sctx, sess, id) }()
	go func() { defer wg.Done(); a.renewLoop(sctx, sess, id, cancel) }()
	go func() { defer wg.Done(); a.drain(sctx, sess) }()
	for {
		select {
		case <-sctx.Done():
			return
		case <-wdC:
			a.beat.alive(stepBudget)
		}
	}
}

// The drain keeps up to drainWindow publishes (and drainBytes of bodies)
// waiting for their PUBACK: a sliding window, so a new message goes out as
// soon as the oldest is acknowledged and the drain runs at the broker's
// pace instead of in bursts.
const (
	drainWindow = 256
	drainBytes  = 1 << 20
)

type inflight struct {
	m    *transport.Message
	wait func(context.Context) error
}

// drain sends queued messages in order and acks each in the outbox after
// its PUBACK, oldest first, so after a crash at most the window is sent
// again. A sender publishes ahead while an acker takes the PUBACKs.
func (a *Agent) drain(ctx context.Context, sess *transport.Session) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	const batchMax = 64
	// In flight: what waits in q, plus the batch the acker is taking.
	q := make(chan inflight, drainWindow-batchMax)
	room := make(chan struct{}, 1)
	var pending atomic.Int64 // body bytes in flight
	acker := make(chan struct{})
	// Delivered spool files leave the spool on a goroutine of their own,
	// beside the acker: file-system work must not hold back the PUBACKs.
	// The small queue bounds what a crash can send again.
	retireQ, retired := make(chan []string, 2), make(chan struct{})
	go func() {
		defer close(retired)
		for paths := range retireQ {
			for _, p := range paths {
				a.spoolSent(p)
			}
		}
	}()
	go func() {
		defer close(acker)
		defer close(retireQ)
		defer cancel() // a failed publish ends the sender too
		polled, stopPoll := context.WithCancel(ctx)
		stopPoll() // a done context: wait only reports a PUBACK already in
		batch := make([]inflight, 0, batchMax)
		var held *inflight
		for {
			f, ok := inflight{}, true
			if held != nil {
				f, held = *held, nil
			} else if f, ok = <-q; !ok {
				return
			}
			if err := f.wait(ctx); err != nil {
				return // resent from the outbox on the next connection
			}
			// Take the PUBACKs already in with it: one ack write for the lot.
			batch = append(batch[:0], f)
		more:
			for len(batch) < cap(batch) {
				select {
				case g, ok := <-q:
					if !ok {
						break more
					}
					if g.wait(polled) != nil {
						held = &g
						break more
					}
					batch = append(batch, g)
				default:
					break more
				}
			}
			a.delivered(batch, retireQ)
			var n int64
			for _, g := range batch {
				n += int64(len(g.m.Body))
			}
			pending.Add(-n)
			select {
			case room <- struct{}{}:
			default:
			}
		}
	}()
	defer func() { close(q); <-acker; <-retired }()
	sys := make(map[string]string, 4)
	var last uint64
	backlog := false
	setBacklog := func(b bool) {
		if b != backlog && a.opts.Backlog != nil {
			a.opts.Backlog(b)
		}
		backlog = b
	}
	defer setBacklog(false)
	for ctx.Err() == nil {
		msgs, err := a.outbox.Next(last, 64)
		if err != nil {
			a.log.Error("outbox read", "err", err)
			return
		}
		if len(msgs) == 64 {
			setBacklog(true)
		}
		if len(msgs) == 0 {
			setBacklog(false)
			a.updateDepth()
			select {
			case <-ctx.Done():
			case <-a.kick:
			}
			continue
		}
		for _, m := range msgs {
			for n := int64(len(m.Body)); pending.Load() > 0 && pending.Load()+n > drainBytes; {
				select {
				case <-room:
				case <-ctx.Done():
					return
				}
			}
			clear(sys)
			for k, v := range m.System {
				sys[k] = v
			}
			sys["mid"] = m.ID
			pending.Add(int64(len(m.Body)))
			f := inflight{m, sess.PublishTelemetry(m.Body, sys, m.App)}
			select {
			case q <- f:
			case <-ctx.Done():
				return
			}
			last = m.Seq
		}
	}
}

// delivered records PUBACKs: the acks are written to the outbox before the
// producers' copies (spool files) are handed to retire for deletion.
func (a *Agent) delivered(batch []inflight, retire chan<- []string) {
	seqs := make([]uint64, len(batch))
	var local []string
	for i, f := range batch {
		seqs[i] = f.m.Seq
		if f.m.Local != "" {
			local = append(local, f.m.Local)
		}
	}
	if err := a.outbox.Ack(seqs...); err != nil {
		// Unrecorded acks mean messages sent again later, never lost.
		if a.repeatedNoSpace(a.cfg.Load().StateDir, err) {
			a.log.Debug("outbox ack", "err", err)
		} else {
			a.log.Error("outbox ack", "err", err)
		}
	}
	if len(local) > 0 {
		retire <- local
	}
	last := batch[len(batch)-1].m.ID
	a.status.Update(false, func(s *Status) { s.LastAckID, s.LastAckAt = last, a.opts.Now().UTC() })
}

func (a *Agent) updateDepth() {
	n, b := a.outbox.Depth()
	a.status.Update(false, func(s *Status) { s.OutboxDepth, s.OutboxBytes = n, b })
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
	a.updateDepth()
	a.wake()
	return err
}
