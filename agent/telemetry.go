package agent

import (
	"github.com/gwagent/gwagent/telemetry"
	"github.com/gwagent/gwagent/telemetry/outbox"
)

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
		Sink:       a.status,
		Clock:      a.clock,
		Logger:     a.log,
		Backlog:    a.opts.Backlog,
		Changed:    func(urgent bool) { a.status.Update(urgent, func(*Status) {}) },
		NewWatcher: a.opts.newWatcher,
	})
	if err != nil {
		return err
	}
	a.pipe = p
	a.status.Counters(func(s *Status) {
		st := p.Stats()
		s.OutboxDepth, s.OutboxBytes, s.OutboxDamaged = st.OutboxDepth, st.OutboxBytes, st.OutboxDamaged
		s.LastAckID, s.LastAckAt, s.SpoolRejected = st.LastAckID, st.LastAckAt, st.SpoolRejected
	})
	return nil
}
