package main

import (
	"encoding/csv"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/gwagent/gwagent/azsim"
)

// The long-running figures (issue 22): the agent as a gateway runs it for
// days, measured from the outside, as a child process with its logs going
// to a pipe (as to journald), so /proc/PID/io counts only what it writes
// to its state directory and spool.
//
//   - readings: an application puts one 100-byte reading a second into
//     the spool (a temporary name, then a rename, as the README says),
//     health at its default interval: anonymous memory sampled every
//     sampleEvery from minute 2 on, flash bytes written per message, CPU.
//   - health: one 379-byte health message a second, no spool: the flash
//     figure against the payload, and total RSS (the figures of earlier
//     rounds).
//   - idle: health every minute, nothing else: wakeups (context switches
//     of all threads) per second, CPU per minute, anonymous memory.
//
// The soak (-soak 2h, make bench with BENCH_SOAK=2h) runs the readings
// device alone for its duration, and writes every sample to bin/soak.csv.

// sampleEvery is how often the long runs sample memory.
const sampleEvery = 30 * time.Second

// steadyRun is what one long run measured.
type steadyRun struct {
	at2, end    memSample // at minute 2 (or a fifth of a short window) and at the end
	maxAnon     float64   // the highest anonymous RSS sampled from minute 2 on
	maxRefAnon  float64   // the same for the plain paho client beside it (readings runs)
	refEnded    bool      // the plain paho client exited before the end
	samples     int
	msgs        int
	payload     float64       // mean body bytes per message
	perMsg      float64       // bytes written per message
	cpuPerMin   time.Duration // user+system per minute, from minute 2 on
	wakeups     float64       // context switches of all threads per second, from minute 2 on
	minutes     float64       // from minute 2 to the end
	threads     int
	firstToLast time.Duration
}

// longRun runs a device for window with health messages every interval,
// and, with readings, a 100-byte spool reading every second; samples go
// to csvPath if set.
func (b *bench) longRun(name, interval string, readings bool, window time.Duration, csvPath string) (steadyRun, error) {
	var r steadyRun
	// Its own azsim: the drain's outage must not reach this device.
	az, info, tel, err := startAzsim(filepath.Join(b.dir, "azsim-"+name), 1)
	if err != nil {
		return r, err
	}
	defer az.Close()
	defer tel.close()
	d, reg := b.device(info, az, interval, "info")
	t0 := time.Now()
	cmd, err := b.start(d)
	if err != nil {
		return r, err
	}
	defer stop(cmd)
	pid := cmd.Process.Pid
	if !waitFor(60*time.Second, func() bool { return tel.count(reg) >= 1 }) {
		return r, fmt.Errorf("%s: no telemetry", name)
	}
	refPid := 0
	if readings {
		ref, err := b.startMemRef(az, info, tel, "memref-"+name)
		if err != nil {
			return r, err
		}
		defer stop(ref)
		refPid = ref.Process.Pid
	}
	stopFeed := make(chan struct{})
	fed := make(chan error, 1)
	if readings {
		go func() { fed <- feedReadings(filepath.Join(d, "state", "spool"), stopFeed) }()
	} else {
		close(fed)
	}
	defer func() {
		close(stopFeed)
		<-fed
	}()
	var w *csv.Writer
	if csvPath != "" {
		f, err := os.Create(csvPath)
		if err != nil {
			return r, err
		}
		defer f.Close()
		w = csv.NewWriter(f)
		defer w.Flush()
		w.Write([]string{"seconds", "rss_anon_mib", "rss_mib", "pss_mib", "threads", "messages", "write_bytes", "cpu_ms", "plain_client_rss_anon_mib"})
	}
	at2 := min(2*time.Minute, window/5)
	var st0 devStats
	var w0, cs0 float64
	var cpu0 time.Duration
	var t2 time.Time
	for {
		el := time.Since(t0)
		if el >= window {
			break
		}
		if el >= at2 && t2.IsZero() {
			// Minute 2: the start-up is over; the measured span begins.
			t2, st0 = time.Now(), tel.get(reg)
			w0, cs0, cpu0 = procField(pid, "io", "write_bytes"), ctxSwitches(pid), procCPU(pid)
			r.at2 = sampleMem(pid)
		}
		next := min(sampleEvery, window-el)
		if t2.IsZero() {
			next = min(next, at2-el)
		}
		time.Sleep(next)
		s := sampleMem(pid)
		var ref memSample
		if refPid != 0 {
			ref = sampleMem(refPid)
		}
		if w != nil {
			w.Write([]string{strconv.Itoa(int(time.Since(t0).Seconds())), fmt.Sprintf("%.3f", s.anon), fmt.Sprintf("%.3f", s.rss),
				fmt.Sprintf("%.3f", s.pss), strconv.Itoa(int(procField(pid, "status", "Threads"))), strconv.Itoa(tel.count(reg)),
				strconv.Itoa(int(procField(pid, "io", "write_bytes"))), strconv.Itoa(int(procCPU(pid).Milliseconds())), fmt.Sprintf("%.3f", ref.anon)})
			w.Flush()
		}
		if !t2.IsZero() {
			r.maxAnon = max(r.maxAnon, s.anon)
			r.maxRefAnon = max(r.maxRefAnon, ref.anon)
			r.samples++
		}
	}
	r.end = sampleMem(pid)
	r.refEnded = refPid != 0 && sampleMem(refPid).anon == 0 // exited: a zombie has no memory
	r.threads = int(procField(pid, "status", "Threads"))
	span := time.Since(t2)
	r.minutes = span.Minutes()
	r.cpuPerMin = time.Duration(float64(procCPU(pid)-cpu0) / r.minutes)
	r.wakeups = (ctxSwitches(pid) - cs0) / span.Seconds()
	st1 := tel.get(reg)
	r.msgs = max(st1.n-st0.n, 1)
	r.payload = float64(st1.bodyBytes-st0.bodyBytes) / float64(r.msgs)
	r.perMsg = (procField(pid, "io", "write_bytes") - w0) / float64(r.msgs)
	r.firstToLast = st1.last.Sub(st0.last)
	return r, nil
}

// feedReadings is the application of the readings run: one reading of
// 100 bytes a second, written under a temporary name and renamed into
// the spool.
func feedReadings(spool string, stop <-chan struct{}) error {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for i := 0; ; i++ {
		select {
		case <-stop:
			return nil
		case <-t.C:
		}
		body := fmt.Sprintf(`{"k":%d,"t":%d,"temp":21.5,"rh":40.1,"pad":""}`, i, time.Now().Unix())
		body = strings.Replace(body, `""`, `"`+strings.Repeat("x", 100-len(body))+`"`, 1)
		p := filepath.Join(spool, fmt.Sprintf("r%07d.json", i))
		if err := os.WriteFile(p+".tmp", []byte(body), 0o640); err != nil {
			return err
		}
		if err := os.Rename(p+".tmp", p); err != nil {
			return err
		}
	}
}

// ctxSwitches sums the voluntary and involuntary context switches of all
// of pid's threads: each is a wakeup of the process.
func ctxSwitches(pid int) float64 {
	tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*", pid))
	var n float64
	for _, t := range tasks {
		tid, _ := strconv.Atoi(filepath.Base(t))
		n += procField(pid, "task/"+strconv.Itoa(tid)+"/status", "voluntary_ctxt_switches")
		n += procField(pid, "task/"+strconv.Itoa(tid)+"/status", "nonvoluntary_ctxt_switches")
	}
	return n
}

// steady runs the three long runs side by side for the window.
func (b *bench) steady(window time.Duration) ([]row, error) {
	type res struct {
		r   steadyRun
		err error
	}
	hc, ic := make(chan res, 1), make(chan res, 1)
	go func() { r, err := b.longRun("health", "1s", false, window, ""); hc <- res{r, err} }()
	go func() { r, err := b.longRun("idle", "60s", false, window, ""); ic <- res{r, err} }()
	rd, err := b.longRun("readings", "60s", true, window, "")
	h, i := <-hc, <-ic
	for _, e := range []error{err, h.err, i.err} {
		if e != nil {
			return nil, e
		}
	}
	hr, ir := h.r, i.r
	at := fmt.Sprintf("minute %.0f", min(2*time.Minute, window/5).Minutes())
	end := fmt.Sprintf("minute %.0f", window.Minutes())
	return []row{
		{"RSS anonymous, 1 reading/s, highest from " + at, rd.maxAnon, "MiB", "<= 3.0", judge(rd.maxAnon <= 3.0),
			fmt.Sprintf("%d samples every %s to %s; %.2f at %s, %.2f at the end; %d threads", rd.samples, sampleEvery, end, rd.at2.anon, at, rd.end.anon, rd.threads)},
		refRow("1 reading/s", at, rd),
		{"flash bytes written per message, 1 reading/s of 100 B", rd.perMsg, "B", "<= 512", judge(rd.perMsg <= 512),
			fmt.Sprintf("payload %.0f B; %d messages over %.1f min, /proc/PID/io write_bytes", rd.payload, rd.msgs, rd.minutes)},
		{"agent CPU per minute, 1 reading/s", float64(rd.cpuPerMin) / float64(time.Millisecond), "ms", "", "", fmt.Sprintf("%.1f wakeups/s", rd.wakeups)},
		{"RSS total, 1 health message/s, " + end, hr.end.rss, "MiB", "", "", fmt.Sprintf("PSS %.2f, binary pages %.2f, anonymous %.2f (highest %.2f)", hr.end.pss, hr.end.file, hr.end.anon, hr.maxAnon)},
		{"flash bytes written per message, 1 health message/s", hr.perMsg, "B", fmt.Sprintf("<= %.0f (2x)", 2*hr.payload), judge(hr.perMsg <= 2*hr.payload),
			fmt.Sprintf("payload %.0f B; %d messages over %.1f min", hr.payload, hr.msgs, hr.minutes)},
		{"idle: wakeups per second (all threads)", ir.wakeups, "/s", "<= 2", judge(ir.wakeups <= 2), "health every 60 s, nothing else; voluntary + involuntary context switches"},
		{"idle: CPU per minute", float64(ir.cpuPerMin) / float64(time.Millisecond), "ms", "<= 20", judge(ir.cpuPerMin <= 20*time.Millisecond), fmt.Sprintf("over %.1f min", ir.minutes)},
		{"idle: RSS anonymous, highest from " + at, ir.maxAnon, "MiB", "<= 3.0", judge(ir.maxAnon <= 3.0), fmt.Sprintf("%.2f at the end", ir.end.anon)},
	}, nil
}

// soak runs the readings device alone for d and reports its memory.
func (b *bench) soak(d time.Duration, csvPath string) ([]row, error) {
	r, err := b.longRun("soak", "60s", true, d, csvPath)
	if err != nil {
		return nil, err
	}
	return []row{
		{fmt.Sprintf("soak %s, 1 reading/s: RSS anonymous, highest from minute 2", d), r.maxAnon, "MiB", "<= 3.0", judge(r.maxAnon <= 3.0),
			fmt.Sprintf("%d samples every %s; %.2f at minute 2, %.2f at the end; samples in %s", r.samples, sampleEvery, r.at2.anon, r.end.anon, csvPath)},
		refRow("soak", "minute 2", r),
		{"soak: flash bytes written per message", r.perMsg, "B", "<= 512", judge(r.perMsg <= 512), fmt.Sprintf("%d messages over %.0f min", r.msgs, r.minutes)},
		{"soak: agent CPU per minute", float64(r.cpuPerMin) / float64(time.Millisecond), "ms", "", "", fmt.Sprintf("%.1f wakeups/s, %d threads at the end", r.wakeups, r.threads)},
	}, nil
}

// refRow is the plain paho client's memory beside the agent's: the floor
// that paho, TLS and Go's runtime make, against which the agent's figure
// is read.
func refRow(what, from string, r steadyRun) row {
	if r.refEnded || r.maxRefAnon == 0 {
		return row{"plain paho client beside it (" + what + "): RSS anonymous, highest from " + from, 0, "MiB", "", "",
			"devtools/bench/memref ended before the window did (its error is above): no reference in this run"}
	}
	return row{"plain paho client beside it (" + what + "): RSS anonymous, highest from " + from, r.maxRefAnon, "MiB", "", "",
		fmt.Sprintf("devtools/bench/memref, one ~100-byte message a second, Go's default GC; the agent has %.2f MiB more (%.2fx)", r.maxAnon-r.maxRefAnon, r.maxAnon/r.maxRefAnon)}
}

// startMemRef builds and starts the memory reference (devtools/bench/memref)
// as a device of az, the run's own azsim: the bench's main hub goes down
// in the drain's outages, which ended the plain client once.
func (b *bench) startMemRef(az *azsim.Server, info azsim.Info, tel *telemetry, reg string) (*exec.Cmd, error) {
	bin := filepath.Join(b.dir, "memref")
	b.mu.Lock()
	_, err := os.Stat(bin)
	if err != nil {
		// Static and CGO-free, as the agent the bench runs.
		build := exec.Command("go", "build", "-trimpath", "-ldflags", "-s -w", "-o", bin, "./devtools/bench/memref")
		build.Env = append(os.Environ(), "CGO_ENABLED=0")
		out, berr := build.CombinedOutput()
		if berr != nil {
			b.mu.Unlock()
			return nil, fmt.Errorf("building the memory reference: %v: %s", berr, out)
		}
	}
	b.mu.Unlock()
	job, err := newPahoJobAt(az, info, tel, 0, reg)
	if err != nil {
		return nil, err
	}
	jf := filepath.Join(b.dir, reg+".json")
	j, _ := json.Marshal(job)
	if err := os.WriteFile(jf, j, 0o600); err != nil {
		return nil, err
	}
	cmd := exec.Command(bin, jf)
	cmd.Stderr = os.Stderr
	return cmd, cmd.Start()
}
