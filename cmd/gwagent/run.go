package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/gwagent/gwagent/agent"
	"github.com/gwagent/gwagent/internal/clock"
	"github.com/gwagent/gwagent/internal/diskspace"
	"github.com/gwagent/gwagent/internal/statelock"
	"github.com/gwagent/gwagent/internal/tlsconf"
	"github.com/gwagent/gwagent/keystore"
	"github.com/gwagent/gwagent/provisioning"
)

func cmdRun(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flags("run", "--config FILE", stderr)
	cfgPath := fs.String("config", "/etc/gwagent/gwagent.toml", "config file (its directory is watched for changes)")
	if err := parse(fs, args); err != nil {
		return err
	}
	backlog := gatewayRuntime(ctx)
	level := new(slog.LevelVar)
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))
	bt, _ := time.Parse(time.RFC3339, buildTime)
	if os.Getenv(restartedAtEnv) != "" {
		keepName()
	}
	opts := agent.Options{Logger: log, LogLevel: level, Version: version, BuildTime: bt, Backlog: backlog,
		RestartWithNewIdentity: restartPolicy(log)}
	for {
		err := runAgent(ctx, *cfgPath, opts, log)
		if !errors.Is(err, agent.ErrRestart) {
			log.Info("gwagent stopped")
			return err
		}
		// The same process (pid, systemd's watchdog and notify socket, the
		// journal's stream) in a fresh image; exec returns only on failure.
		log.Info("gwagent restarting in a fresh process for its new identity")
		env := append(os.Environ(), restartedAtEnv+"="+strconv.FormatInt(clock.Real{}.Now().Unix(), 10))
		err = syscall.Exec("/proc/self/exe", os.Args, env)
		log.Warn("could not restart in a fresh process; going on in this one (it keeps the memory the new identity cost)", "err", err)
		opts.RestartWithNewIdentity = nil
	}
}

// restartedAtEnv tells the fresh image when the previous one restarted
// (Unix seconds); it is not passed on further.
const restartedAtEnv = "GWAGENT_RESTARTED_AT"

// keepName gives a process restarted in a fresh image its name back: the
// kernel names a process after the file it executes, here "exe" (from
// /proc/self/exe), which ps, top, pgrep and pidof then showed and matched
// instead of "gwagent". The name is argv[0]'s base, as at the first start;
// best effort.
func keepName() {
	name := filepath.Base(os.Args[0])
	if len(name) > 15 { // the kernel's limit (TASK_COMM_LEN less its NUL)
		name = name[:15]
	}
	_ = os.WriteFile("/proc/self/comm", []byte(name), 0)
}

// restartGap is the least time between two restarts in a fresh image. A
// new identity the fresh image cannot find (a state directory that loses
// writes) would otherwise have it register with DPS again, restart, and
// so on, as fast as DPS answers; within the gap the agent goes on in the
// same process instead.
const restartGap = 10 * time.Minute

// restartPolicy is the agent's Options.RestartWithNewIdentity.
func restartPolicy(log *slog.Logger) func() bool {
	last, _ := strconv.ParseInt(os.Getenv(restartedAtEnv), 10, 64)
	os.Unsetenv(restartedAtEnv)
	return func() bool {
		since := clock.Real{}.Now().Sub(time.Unix(last, 0))
		if last > 0 && since < restartGap && since > -restartGap {
			log.Info("new identity; going on in this process: it began with a restart less than 10 minutes ago", "restarted", since.Round(time.Second))
			return false
		}
		return true
	}
}

// runAgent runs one agent until ctx ends or it asks for a restart; SIGHUP
// asks it for a renewal.
func runAgent(ctx context.Context, cfgPath string, opts agent.Options, log *slog.Logger) error {
	hup := make(chan os.Signal, 1) // taken from the start: SIGHUP would end the process
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	a, err := agent.New(cfgPath, opts)
	if err != nil {
		return err
	}
	log.Info("gwagent starting", "version", version, "config", cfgPath)
	static := a.Config().Static()
	done := make(chan struct{})
	defer close(done)
	go func() {
		for {
			select {
			case <-done:
				return
			case <-hup:
				if static {
					log.Warn("SIGHUP ignored: static mode, the factory certificate is not renewed by gwagent")
					continue
				}
				a.RequestRenewal("SIGHUP")
			}
		}
	}()
	err = a.Run(ctx)
	if errors.Is(err, agent.ErrRestart) {
		// Until the fresh image listens for it, a SIGHUP (systemctl
		// reload, gwagent renew) would end the process, and systemd does
		// not restart a service that SIGHUP ended: ignore it from now,
		// before Stop above lets it go (exec keeps ignored signals
		// ignored; signal.Notify takes it back).
		signal.Ignore(syscall.SIGHUP)
	}
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
	now := clock.Real{}.Now() // status.json's times are the system clock's
	st, serr := agent.ReadStatus(cfg.StateDir)
	w := func(k, v string) { fmt.Fprintf(stdout, "%-16s %s\n", k+":", v) }
	switch {
	case serr == nil:
		age := now.Sub(st.UpdatedAt).Round(time.Second)
		pid, lerr := statelock.Holder(cfg.StateDir)
		running := pid != 0
		if lerr != nil { // cannot tell from the lock: fall back on the pid
			running = st.State != "stopped" && processAlive(st.PID)
		}
		switch {
		case running:
			w("state", fmt.Sprintf("%s (updated %s ago, %s)", st.State, age, st.UpdatedAt.Format(time.RFC3339)))
		case st.State == "stopped":
			w("state", fmt.Sprintf("stopped %s ago (%s)", age, st.UpdatedAt.Format(time.RFC3339)))
		default:
			w("state", fmt.Sprintf("%s (agent not running; last update %s ago, %s)", st.State, age, st.UpdatedAt.Format(time.RFC3339)))
		}
		for _, c := range slices.Sorted(maps.Keys(st.Conditions)) {
			w("condition", string(c)+": "+st.Conditions[c])
		}
	case errors.Is(serr, os.ErrNotExist):
		// A running agent that found no room for its status file (a new
		// state directory on a full disk) is still running: say so, and
		// why there is no status.
		pid, _ := statelock.Holder(cfg.StateDir)
		switch {
		case pid == 0:
			w("state", "never run")
		case pid > 0:
			w("state", fmt.Sprintf("running (pid %d), no status file written yet", pid))
		default:
			w("state", "running, no status file written yet")
		}
		if room, err := diskspace.HasRoom(cfg.StateDir, 64<<10, 4); err == nil && !room {
			w("condition", string(agent.CondDiskFull)+": "+diskspace.Reason(cfg.StateDir))
		}
	default:
		w("state", "unreadable: "+serr.Error())
	}
	id, ierr := statusIdentity(cfg)
	switch {
	case ierr == nil:
		if cfg.Static() {
			w("mode", "static (factory certificate, no DPS; gwagent does not renew it)")
		}
		w("device id", id.DeviceID)
		w("hub", id.AssignedHub)
		w("certificate", fmt.Sprintf("serial %s, valid %s to %s (%s)", id.Serial,
			id.NotBefore.Format(time.RFC3339), id.NotAfter.Format(time.RFC3339), timeLeft(id.NotAfter.Sub(now))))
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
		switch {
		case cfg.Static():
			w("next renewal", "none (static mode)")
		case st.NextRenewal.IsZero():
			w("next renewal", "not scheduled")
		default:
			w("next renewal", st.NextRenewal.Format(time.RFC3339))
		}
		if st.Transport != "" {
			w("transport", st.Transport+" (last hub connection; [network] transport = "+cfg.Network.Transport+")")
		}
		noun := "messages"
		if st.OutboxDepth == 1 {
			noun = "message"
		}
		w("outbox", fmt.Sprintf("%d %s, %d bytes", st.OutboxDepth, noun, st.OutboxBytes))
		switch budget := cfg.Telemetry.Rate(); {
		case budget == 0:
			w("sending", "unpaced ([telemetry] max_rate = 0)")
		case st.SendRate > 0 && st.SendRate < budget:
			w("sending", fmt.Sprintf("%.3g messages/s, slowed by the hub from the %.3g/s budget ([telemetry] max_rate)", st.SendRate, budget))
		default:
			w("sending", fmt.Sprintf("up to %.3g messages/s ([telemetry] max_rate)", budget))
		}
		if q := st.HubQuota; q != nil {
			w("hub quota", fmt.Sprintf("the hub refused messages %d time(s) since %s; next probe %s", q.Refusals, q.Since.Format(time.RFC3339), q.NextProbe.Format(time.RFC3339)))
		}
		if st.OutboxDamaged > 0 {
			w("outbox damaged", fmt.Sprintf("%d records skipped at start (see the log)", st.OutboxDamaged))
		}
		if st.LastAckID != "" {
			w("last acked", st.LastAckID+" at "+st.LastAckAt.Format(time.RFC3339))
		} else {
			w("last acked", "none yet")
		}
	}
	spool := cfg.Telemetry.SpoolDir
	ents, _ := os.ReadDir(filepath.Join(spool, "rejected"))
	refused, removed := int64(0), int64(0)
	if serr == nil {
		refused, removed = st.SpoolRejected, st.SpoolRejectedRemoved
	}
	line := fmt.Sprintf("%s; %d files refused since the agent started, %d in %s (the newest %d are kept", spool, refused, len(ents), filepath.Join(spool, "rejected"), agent.SpoolRejectedKeep)
	if removed > 0 {
		line += fmt.Sprintf("; %d older ones removed", removed)
	}
	w("spool", line+")")
	return nil
}

// statusIdentity is the identity the agent connects with: the factory
// certificate in static mode, else the committed DPS identity.
func statusIdentity(cfg *agent.Config) (*provisioning.Identity, error) {
	if cfg.Static() {
		chain, err := tlsconf.LoadChain(cfg.Hub.Chain)
		if err != nil {
			return nil, fmt.Errorf("[hub] chain: %w", err)
		}
		return &provisioning.Identity{KeyURI: cfg.Operational.Key, DeviceID: cfg.Hub.DeviceID, AssignedHub: cfg.Hub.Host,
			ChainPath: cfg.Hub.Chain, NotBefore: chain[0].NotBefore, NotAfter: chain[0].NotAfter,
			Serial: provisioning.FormatSerial(chain[0].SerialNumber)}, nil
	}
	return currentIdentity(cfg.StateDir)
}

// currentIdentity reads the committed identity without creating the store:
// status and check run as root, and a store directory made by root before
// the service's first provisioning would lock the service user out of it.
func currentIdentity(stateDir string) (*provisioning.Identity, error) {
	if _, err := os.Stat(filepath.Join(stateDir, "identity")); errors.Is(err, os.ErrNotExist) {
		return nil, provisioning.ErrNotProvisioned
	} else if errors.Is(err, os.ErrPermission) {
		return nil, fmt.Errorf("%w; run gwagent as root or as the service's user (sudo -u gwagent)", err)
	}
	store, err := provisioning.OpenStore(stateDir)
	if err != nil {
		return nil, err
	}
	return store.Current()
}

func timeLeft(d time.Duration) string {
	if d < 0 {
		return fmt.Sprintf("EXPIRED %s ago", (-d).Round(time.Second))
	}
	return fmt.Sprintf("%s left", d.Round(time.Second))
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
	if cfg.Static() {
		return fmt.Errorf("renew: this device is in static mode ([hub] host, device_id and chain): its factory certificate cannot be renewed by gwagent; install a new chain at %s and restart the service", cfg.Hub.Chain)
	}
	if pid, err := statelock.Holder(cfg.StateDir); err != nil {
		return fmt.Errorf("renew: %w; run as the service user (gwagent) or root", err)
	} else if pid == -1 {
		return errors.New("renew: the agent is starting; try again in a moment")
	} else if pid > 0 {
		if !processAlive(pid) {
			// The lock file's pid is stale (an agent that could not write
			// it); the running agent's own status names it.
			st, err := agent.ReadStatus(cfg.StateDir)
			if err != nil || !processAlive(st.PID) {
				return fmt.Errorf("renew: an agent holds %s but its pid is unknown; use systemctl reload gwagent", cfg.StateDir)
			}
			pid = st.PID
		}
		if err := syscall.Kill(pid, syscall.SIGHUP); err != nil {
			return fmt.Errorf("renew: cannot signal the running agent (pid %d): %w; run as its user or root", pid, err)
		}
		fmt.Fprintf(stdout, "asked the running agent (pid %d) to renew its certificate; follow it with `gwagent status` or its log\n", pid)
		return nil
	}
	hold, err := holdState(ctx, cfg.StateDir, stderr, realHost)
	if err != nil {
		return fmt.Errorf("renew: %w", err)
	}
	defer hold.release(ctx, cfg.Operational.Key)
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

// gatewayRuntime keeps the running agent's memory small and flat: its live heap
// is under 1 MB, but Go's defaults let the heap reach 4 MB before the first
// collection and hand freed pages back to the kernel only slowly, so RSS
// climbed for minutes after start. A lower GC target, and every 15 s a
// collection that returns free pages at once (under a millisecond of CPU),
// keep it flat: at one reading a second, anonymous memory stayed at
// 3.10 MiB where a collection once a minute let it climb to 3.48 MiB in
// six minutes (make bench's soak, same run), for no measurable CPU.
// GOGC in the environment still wins.
//
// The agent runs Go code on one processor (GOMAXPROCS=1), unless the
// environment sets GOMAXPROCS. A second processor costs 0.2-0.5 MiB of
// anonymous memory, since each keeps its own partly used span for every
// allocation size, and buys nothing while the agent sends a message a
// minute. It once bought a faster drain, so a backlog switched it on; with
// paho's writes coalesced it bought nothing there either and cost CPU,
// the goroutines handing messages to each other across threads: in make
// bench's 20,000-message drain, 38.0 and 38.5 us of CPU per message on one
// processor (1.16x and 1.10x the plain paho client), 65.0 and 49.5 us with
// the second (1.80x and 1.31x), at the same pace (21-26k against 15-20k
// messages a second). For the length of a drain (backlog, the agent's
// Options.Backlog) the GC target is Go's default (100): the drain
// allocates for every message, and at the steady target collections took
// about 7% of its CPU; the 15 s collection gives the memory back once it
// is over.
func gatewayRuntime(ctx context.Context) (backlog func(bool)) {
	if os.Getenv("GOMAXPROCS") == "" {
		runtime.GOMAXPROCS(1)
	}
	if os.Getenv("GOGC") != "" {
		return nil
	}
	debug.SetGCPercent(steadyGC)
	go func() {
		t, tick := clock.Real{}.NewTicker(15 * time.Second)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick:
				debug.FreeOSMemory()
			}
		}
	}()
	return func(busy bool) {
		if busy {
			debug.SetGCPercent(drainGC)
		} else {
			debug.SetGCPercent(steadyGC)
		}
	}
}

// The GC targets (GOGC) while steady and while draining a backlog.
const (
	steadyGC = 50
	drainGC  = 100
)
