package agent

import (
	"context"
	"encoding/json"
	"time"

	"github.com/gwagent/gwagent/telemetry"
	"github.com/gwagent/gwagent/telemetry/outbox"
)

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
	// The first one as soon as the hub is reached, so the cloud sees a
	// (re)started gateway at once and the message already names the
	// certificate and transport in use; after one interval if the hub stays
	// out of reach.
	first := time.NewTimer(time.Duration(a.interval.Load()))
	select {
	case <-ctx.Done():
		first.Stop()
		return
	case <-a.up:
	case <-first.C:
	}
	first.Stop()
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

// reachedHub marks the first connection to the hub since start.
func (a *Agent) reachedHub() { a.upOnce.Do(func() { close(a.up) }) }

func (a *Agent) sendHealth() {
	cfg := a.cfg.Load()
	now := a.clock.Now()
	h := a.health.read(now, cfg.StateDir)
	h.AgentUptime = now.Sub(a.started).Seconds()
	h.AgentVersion = a.opts.Version
	st := a.status.Snapshot()
	h.AgentState = st.State
	h.Transport = st.Transport
	for c := range st.Conditions {
		h.ConditionsActive = append(h.ConditionsActive, string(c))
	}
	if !st.CertNotAfter.IsZero() {
		days := st.CertNotAfter.Sub(now).Hours() / 24
		h.CertDaysLeft = &days
	}
	ps := a.pipe.Stats()
	h.OutboxDepth, h.SpoolRejected, h.SpoolRejectedRemoved = ps.OutboxDepth, ps.SpoolRejected, ps.SpoolRejectedRemoved
	h.SendRate = ps.SendRate
	if !ps.Quota.Since.IsZero() {
		h.HubQuota = &ps.Quota
	}
	body, _ := json.Marshal(h)
	if err := a.pipe.Enqueue(&outbox.Message{Kind: outbox.KindHealth, Body: body,
		System: map[string]string{"ct": "application/json", "ce": "utf-8"},
		App:    map[string]string{"type": "health"}}); err != nil {
		a.log.Warn("health message not queued", "err", err)
	}
}

// quotaHold is how long to wait before the next hub connection: while the
// hub refuses messages as over its daily quota, until the pipeline's next
// probe (at most one connection per 10 minutes, telemetry/quota.go),
// instead of the reconnect backoff's seconds.
func (a *Agent) quotaHold() time.Duration {
	at := a.pipe.ConnectAfter()
	if at.IsZero() {
		return 0
	}
	d := at.Sub(a.clock.Now())
	if d > 0 {
		a.log.Info("holding the hub connection back until the next probe", "at", at.UTC().Format(time.RFC3339), "in", d.Round(time.Second))
	}
	return d
}

// openPipeline opens the telemetry pipeline on the config's state and spool
// directories; the status file reads its counters when it is written.
func (a *Agent) openPipeline(cfg *Config) error {
	p, err := telemetry.Open(telemetry.Options{
		StateDir: cfg.StateDir,
		Outbox:   outbox.Options{MaxBytes: cfg.Outbox.MaxBytes},
		Spool: func() telemetry.Spool {
			c := a.cfg.Load()
			return telemetry.Spool{Dir: c.Telemetry.SpoolDir, Settle: c.Telemetry.SpoolSettle.Duration}
		},
		Sending: func() telemetry.Sending {
			t := a.cfg.Load().Telemetry
			return telemetry.Sending{MaxRate: t.Rate(), Pack: t.Pack, PackBytes: t.PackBytes, PackWait: t.PackWait.Duration}
		},
		Sink:    a.status,
		Clock:   a.clock,
		Logger:  a.log,
		Backlog: a.opts.Backlog,
		Changed: func(urgent bool) { a.status.Update(urgent, func(*Status) {}) },
		Inotify: a.opts.newInotify,
	})
	if err != nil {
		return err
	}
	a.pipe = p
	a.status.counters = func(s *Status) {
		st := p.Stats()
		s.OutboxDepth, s.OutboxBytes, s.OutboxDamaged = st.OutboxDepth, st.OutboxBytes, st.OutboxDamaged
		s.LastAckID, s.LastAckAt, s.SpoolRejected = st.LastAckID, st.LastAckAt, st.SpoolRejected
		s.SpoolRejectedRemoved = st.SpoolRejectedRemoved
		s.SendRate, s.HubQuota = st.SendRate, nil
		if !st.Quota.Since.IsZero() {
			s.HubQuota = &st.Quota
		}
	}
	return nil
}
