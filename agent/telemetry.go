package agent

import (
	"time"

	"github.com/gwagent/gwagent/telemetry"
	"github.com/gwagent/gwagent/telemetry/outbox"
)

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
	a.status.Counters(func(s *Status) {
		st := p.Stats()
		s.OutboxDepth, s.OutboxBytes, s.OutboxDamaged = st.OutboxDepth, st.OutboxBytes, st.OutboxDamaged
		s.LastAckID, s.LastAckAt, s.SpoolRejected = st.LastAckID, st.LastAckAt, st.SpoolRejected
		s.SpoolRejectedRemoved = st.SpoolRejectedRemoved
		s.SendRate, s.HubQuota = st.SendRate, nil
		if !st.Quota.Since.IsZero() {
			s.HubQuota = &st.Quota
		}
	})
	return nil
}
