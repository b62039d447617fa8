package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/gwagent/gwagent/agent"
	"github.com/gwagent/gwagent/keystore"
	"github.com/gwagent/gwagent/provisioning"
)

func cmdRun(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flags("run", "--config FILE", stderr)
	cfgPath := fs.String("config", "/etc/gwagent/gwagent.toml", "config file (its directory is watched for changes)")
	if err := parse(fs, args); err != nil {
		return err
	}
	level := new(slog.LevelVar)
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))
	bt, _ := time.Parse(time.RFC3339, buildTime)
	a, err := agent.New(*cfgPath, agent.Options{Logger: log, LogLevel: level, Version: version, BuildTime: bt})
	if err != nil {
		return err
	}
	log.Info("gwagent starting", "version", version, "config", *cfgPath)
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	go func() {
		for range hup {
			a.RequestRenewal("SIGHUP")
		}
	}()
	err = a.Run(ctx)
	log.Info("gwagent stopped")
	return err
}

func cmdStatus(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flags("status", "--config FILE", stderr)
	cfgPath := fs.String("config", "/etc/gwagent/gwagent.toml", "config file")
	if err := parse(fs, args); err != nil {
		return err
	}
	cfg, err := agent.LoadConfig(*cfgPath)
	if err != nil {
		return err
	}
	st, serr := agent.ReadStatus(cfg.StateDir)
	store, err := provisioning.OpenStore(cfg.StateDir)
	if err != nil {
		return err
	}
	id, ierr := store.Current()
	w := func(k, v string) { fmt.Fprintf(stdout, "%-16s %s\n", k+":", v) }
	switch {
	case serr == nil:
		state := st.State
		if st.State != "stopped" && !processAlive(st.PID) {
			state += " (agent not running; last update " + st.UpdatedAt.Format(time.RFC3339) + ")"
		}
		w("state", state)
		for c, why := range st.Conditions {
			w("condition", string(c)+": "+why)
		}
	case errors.Is(serr, os.ErrNotExist):
		w("state", "never run")
	default:
		w("state", "unreadable: "+serr.Error())
	}
	switch {
	case ierr == nil:
		w("device id", id.DeviceID)
		w("hub", id.AssignedHub)
		w("certificate", fmt.Sprintf("serial %s, valid %s to %s (%s left)", id.Serial,
			id.NotBefore.Format(time.RFC3339), id.NotAfter.Format(time.RFC3339), time.Until(id.NotAfter).Round(time.Second)))
		w("chain", id.ChainPath)
		if u, err := keystore.Parse(id.KeyURI); err == nil {
			w("key", u.String())
		}
	case errors.Is(ierr, provisioning.ErrNotProvisioned):
		w("identity", "not provisioned (run `gwagent provision` or start the service)")
	default:
		w("identity", "unreadable: "+ierr.Error())
	}
	if serr == nil {
		if st.NextRenewal.IsZero() {
			w("next renewal", "not scheduled")
		} else {
			w("next renewal", st.NextRenewal.Format(time.RFC3339))
		}
		w("outbox", fmt.Sprintf("%d messages, %d bytes", st.OutboxDepth, st.OutboxBytes))
		if st.LastAckID != "" {
			w("last acked", st.LastAckID+" at "+st.LastAckAt.Format(time.RFC3339))
		} else {
			w("last acked", "none yet")
		}
	}
	return nil
}

// processAlive reports whether pid is a running process.
func processAlive(pid int) bool {
	if pid <= 0 {
		return false
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	return err == nil && strings.Contains(string(b), "gwagent")
}

func cmdRenew(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flags("renew", "--config FILE", stderr)
	cfgPath := fs.String("config", "/etc/gwagent/gwagent.toml", "config file")
	if err := parse(fs, args); err != nil {
		return err
	}
	cfg, err := agent.LoadConfig(*cfgPath)
	if err != nil {
		return err
	}
	if st, err := agent.ReadStatus(cfg.StateDir); err == nil && st.State != "stopped" && processAlive(st.PID) {
		if err := syscall.Kill(st.PID, syscall.SIGHUP); err != nil {
			return fmt.Errorf("renew: cannot signal the running agent (pid %d): %w; run as its user or root", st.PID, err)
		}
		fmt.Fprintf(stdout, "asked the running agent (pid %d) to renew its certificate; follow it with `gwagent status` or its log\n", st.PID)
		return nil
	}
	level := new(slog.LevelVar)
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))
	bt, _ := time.Parse(time.RFC3339, buildTime)
	a, err := agent.New(*cfgPath, agent.Options{Logger: log, LogLevel: level, Version: version, BuildTime: bt})
	if err != nil {
		return err
	}
	id, err := a.RenewOnce(ctx)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "renewed: device %s, serial %s, valid until %s (via %s)\nchain: %s\n", id.DeviceID, id.Serial,
		id.NotAfter.Format(time.RFC3339), id.Via, id.ChainPath)
	return nil
}
