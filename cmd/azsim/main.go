// Command azsim is a local emulator of Azure IoT Hub DPS and IoT Hub, for
// trying and testing gwagent (and Microsoft's device SDKs) without Azure.
// `azsim serve` runs it; the other commands talk to its admin API.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/gwagent/gwagent/azsim"
)

const usage = `usage: azsim COMMAND [flags]

commands:
  serve         run DPS, IoT Hub and the admin API (see 'azsim serve -h')
  info          addresses, id scope and trust bundle of a running azsim
  factory-sign  sign an onboarding CSR as the factory CA: azsim factory-sign < csr > chain.pem
  derive-key    device key for a registration id in the symmetric-key group: azsim derive-key REG_ID
  devices       list the hub's devices and their current certificates
  device        enable|disable ID
  method        ID NAME [JSON_PAYLOAD]   invoke a direct method
  c2d           ID MESSAGE               send a cloud-to-device message
  desired       ID JSON                  patch the twin's desired properties
  twin          ID                       show the twin
  registrations list DPS registrations
  enroll        tpm --registration-id ID --ek FILE [--disabled]
                individual enrollment with TPM attestation (FILE: base64 EK, as gwagent onboard tpm --ek-out writes it)
  tpm-enrollments  list the TPM enrollments
  fault         drop [dps|hub|all] | refuse TARGET SECONDS | answer TARGET STATUS [COUNT] [RETRY_AFTER]
                | assign-delay SECONDS | tamper wrong-key|wrong-cn|broken-chain | clear
  ca            upload NAME FILE | verify NAME FILE | list   (hub CA registration, proof of possession)
  quota         [set-used N | clock set TIME | clock advance DURATION | clock reset]
                the hub's tier, throttles and daily quota: use, limit, chunk size, reset time;
                set today's use, or move the quota clock (e.g. clock set 2025-01-01T23:59:50Z)

Admin commands use --admin URL (default $AZSIM_ADMIN or http://127.0.0.1:8480).
`

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdin, os.Stdout, os.Stderr)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "azsim:", err)
		if errors.Is(err, errUsage) {
			os.Exit(2)
		}
		os.Exit(1)
	}
}

var errUsage = errors.New("see 'azsim help'")

func run(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	if len(args) == 0 || args[0] == "help" || args[0] == "-h" || args[0] == "--help" {
		fmt.Fprint(stdout, usage)
		if len(args) == 0 {
			return errUsage
		}
		return nil
	}
	if args[0] == "serve" {
		return serve(ctx, args[1:], stdout, stderr)
	}
	fs := flag.NewFlagSet("azsim "+args[0], flag.ContinueOnError)
	fs.SetOutput(stderr)
	def := os.Getenv("AZSIM_ADMIN")
	if def == "" {
		def = "http://127.0.0.1:8480"
	}
	admin := fs.String("admin", def, "admin API URL")
	if err := fs.Parse(args[1:]); err != nil {
		return errUsage
	}
	c := client{base: strings.TrimRight(*admin, "/"), out: stdout}
	a := fs.Args()
	need := func(n int) error {
		if len(a) < n {
			return fmt.Errorf("%s needs %d argument(s): %w", args[0], n, errUsage)
		}
		return nil
	}
	switch args[0] {
	case "info":
		return c.do("GET", "/info", nil)
	case "factory-sign":
		csr, err := io.ReadAll(stdin)
		if err != nil {
			return err
		}
		return c.do("POST", "/factory/sign", csr)
	case "derive-key":
		if err := need(1); err != nil {
			return err
		}
		return c.do("GET", "/dps/derive-key?group="+azsim.SymmetricKeyGroup+"&registrationId="+url.QueryEscape(a[0]), nil)
	case "devices":
		return c.do("GET", "/hub/devices", nil)
	case "registrations":
		return c.do("GET", "/dps/registrations", nil)
	case "device":
		if err := need(2); err != nil {
			return err
		}
		return c.do("POST", "/hub/devices/"+url.PathEscape(a[1])+"/"+a[0], nil)
	case "method":
		if err := need(2); err != nil {
			return err
		}
		payload := "null"
		if len(a) > 2 {
			payload = a[2]
		}
		return c.do("POST", "/hub/devices/"+url.PathEscape(a[0])+"/methods/"+url.PathEscape(a[1])+"?timeout=30", []byte(payload))
	case "c2d":
		if err := need(2); err != nil {
			return err
		}
		return c.do("POST", "/hub/devices/"+url.PathEscape(a[0])+"/c2d", []byte(a[1]))
	case "desired":
		if err := need(2); err != nil {
			return err
		}
		return c.do("PATCH", "/hub/devices/"+url.PathEscape(a[0])+"/twin/desired", []byte(a[1]))
	case "twin":
		if err := need(1); err != nil {
			return err
		}
		return c.do("GET", "/hub/devices/"+url.PathEscape(a[0])+"/twin", nil)
	case "enroll":
		return c.enroll(a, stderr)
	case "tpm-enrollments":
		return c.do("GET", "/dps/tpm-enrollments", nil)
	case "fault":
		return c.fault(a)
	case "ca":
		return c.ca(a)
	case "quota":
		return c.quota(a)
	}
	return fmt.Errorf("unknown command %q: %w", args[0], errUsage)
}

func serve(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("azsim serve", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var cfg azsim.Config
	fs.StringVar(&cfg.StateDir, "state", "./azsim-state", "state directory: PKI, enrollments, devices, twins (reused across restarts)")
	fs.StringVar(&cfg.DPSAddr, "dps-addr", "127.0.0.1:8883", "DPS MQTT/TLS listen address")
	fs.StringVar(&cfg.DPSHTTPSAddr, "dps-https-addr", "127.0.0.1:8443", "DPS REST (HTTPS) listen address: TPM attestation and dps_transport = \"https\"")
	fs.StringVar(&cfg.HubAddr, "hub-addr", "127.0.0.1:8884", "IoT Hub MQTT/TLS listen address")
	fs.StringVar(&cfg.DPSWSAddr, "dps-ws-addr", "127.0.0.1:8445", "DPS MQTT over WebSockets listen address (Azure's 443; \"off\": none)")
	fs.StringVar(&cfg.HubWSAddr, "hub-ws-addr", "127.0.0.1:8444", "IoT Hub MQTT over WebSockets listen address (Azure's 443; \"off\": none)")
	fs.StringVar(&cfg.AdminAddr, "admin-addr", "127.0.0.1:8480", "admin HTTP API listen address (loopback only)")
	fs.StringVar(&cfg.Hub2Addr, "hub2-addr", "", "start a second IoT Hub on this address; move a device to it with POST /dps/allocate")
	fs.StringVar(&cfg.HubHostName, "hub-hostname", "", "hub name as devices dial it (default localhost:PORT)")
	fs.StringVar(&cfg.IDScope, "id-scope", "0ne00AZSIM0", "DPS id scope")
	fs.DurationVar(&cfg.CertLifetime, "cert-lifetime", 30*24*time.Hour, "lifetime of issued operational certificates (e.g. 90s for renewal demos)")
	fs.StringVar(&cfg.TelemetryLog, "telemetry-log", "", "append one JSON line per device-to-cloud message to this file")
	fs.IntVar(&cfg.RetryAfter, "retry-after", 3, "DPS retry-after seconds while assigning")
	fs.DurationVar(&cfg.IssueDelay, "issue-delay", time.Second, "hub certificate API delay between 202 and 200; up to hours, as real issuance can take (operationExpires follows it)")
	fs.BoolVar(&cfg.AcceptP256, "accept-p256", false, "let DPS accept P-256 CSRs too (default: P-384 only, as documented)")
	fs.StringVar(&cfg.ServerKey, "server-key", "rsa", "TLS server chain: rsa (RSA-2048, as Azure's endpoints) or ecdsa")
	fs.BoolVar(&cfg.NoCertificateManagement, "no-cert-management", false, "play a hub without the certificate-signing API: SUBACK 0x80 for $iothub/credentials/res/#")
	fs.DurationVar(&cfg.CredentialSyncLag, "credential-sync-lag", 5*time.Second, "after a DPS registration the hub refuses the newly issued certificate for this long, as Azure's asynchronous credential sync can (0: none)")
	fs.StringVar(&cfg.HubTier, "hub-tier", "S1", "IoT Hub tier: S1, S2, S3, F1 (free), B1, B2, B3; sets the connection, twin and device-to-cloud throttles and the daily message quota (see azsim quota)")
	fs.IntVar(&cfg.HubUnits, "hub-units", 1, "IoT Hub units of the tier (F1: 1; B3/S3: up to 10; others up to 200)")
	fs.BoolVar(&cfg.Gentle, "gentle", false, "kinder than Azure, for demos: no CA list in the TLS CertificateRequest, bad client certificates get CONNACK 5 instead of a TLS alert, no credential sync lag, no throttling, no daily quota (see docs/azure-fidelity.md)")
	names := fs.String("server-names", "", "comma-separated extra DNS names/IPs for the TLS server certificate (the admin API accepts them as Host too)")
	infoFile := fs.String("info-file", "", "write the info JSON (addresses, id scope, trust bundle) to this file once serving")
	if err := fs.Parse(args); err != nil {
		return errUsage
	}
	if *names != "" {
		cfg.ServerNames = strings.Split(*names, ",")
	}
	lagSet := false
	fs.Visit(func(f *flag.Flag) { lagSet = lagSet || f.Name == "credential-sync-lag" })
	if cfg.Gentle && !lagSet {
		cfg.CredentialSyncLag = 0
	}
	s, err := azsim.New(cfg)
	if err != nil {
		return err
	}
	defer s.Close()
	for _, w := range s.Warnings() {
		fmt.Fprintln(stderr, "azsim: warning:", w)
	}
	if err := s.Start(); err != nil {
		return err
	}
	inf := s.Info()
	b, _ := json.MarshalIndent(inf, "", "  ")
	if *infoFile != "" {
		if err := os.WriteFile(*infoFile, append(b, '\n'), 0o644); err != nil {
			return err
		}
	}
	ws := func(a string) string {
		if a == "" {
			return "off"
		}
		return a
	}
	fmt.Fprintf(stdout, "azsim serving (bound addresses)\n  DPS          %s (id scope %s)\n  DPS (HTTPS)  %s\n  IoT Hub      %s, devices dial %s\n  WebSockets   DPS %s, hub %s (path /$iothub/websocket)\n  admin API    %s\n  trust bundle %s\n",
		inf.Listen.DPS, inf.IDScope, inf.Listen.DPSHTTPS, inf.Listen.Hub, inf.HubHostName, ws(inf.Listen.DPSWebSocket), ws(inf.Listen.HubWebSocket), inf.AdminURL, inf.TrustBundle)
	if l := s.Hub.Limits(); l.Quota.Enabled || l.D2CRate > 0 {
		fmt.Fprintf(stdout, "  hub tier     %s × %d: %d device-to-cloud sends/s (burst %d, backlog %s), %d messages/day in %d-byte chunks (azsim quota)\n",
			l.Tier, l.Units, l.D2CRate, l.D2CBurst, l.D2CBacklog, l.Quota.Limit, l.Quota.ChunkSize)
	} else if l.Tier != "" {
		fmt.Fprintf(stdout, "  hub tier     %s × %d, gentle: no throttling, no daily quota\n", l.Tier, l.Units)
	} else {
		fmt.Fprintf(stdout, "  hub tier     none: no device-to-cloud throttle, no daily quota\n")
	}
	if inf.Listen.Hub2 != "" {
		fmt.Fprintf(stdout, "  second hub   %s, devices dial %s\n", inf.Listen.Hub2, inf.Hub2HostName)
	}
	<-ctx.Done()
	fmt.Fprintln(stdout, "azsim stopping")
	return nil
}

type client struct {
	base string
	out  io.Writer
}

func (c client) do(method, path string, body []byte) error {
	req, err := http.NewRequest(method, c.base+path, bytes.NewReader(body))
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("admin API at %s: %w (is `azsim serve` running? set --admin or AZSIM_ADMIN)", c.base, err)
	}
	defer resp.Body.Close()
	out, _ := io.ReadAll(resp.Body)
	if resp.StatusCode >= 300 {
		return fmt.Errorf("%s %s: %s: %s", method, path, resp.Status, strings.TrimSpace(string(out)))
	}
	c.out.Write(out)
	return nil
}

func (c client) fault(a []string) error {
	if len(a) == 0 {
		return fmt.Errorf("fault needs a kind: %w", errUsage)
	}
	arg := func(i int, d string) string {
		if len(a) > i {
			return a[i]
		}
		return d
	}
	js := func(v map[string]any) []byte { b, _ := json.Marshal(v); return b }
	num := func(s string) float64 { var f float64; fmt.Sscan(s, &f); return f }
	switch a[0] {
	case "drop":
		return c.do("POST", "/faults/drop", js(map[string]any{"target": arg(1, "all")}))
	case "refuse":
		return c.do("POST", "/faults/refuse", js(map[string]any{"target": arg(1, "all"), "seconds": num(arg(2, "10"))}))
	case "answer":
		return c.do("POST", "/faults", js(map[string]any{"target": arg(1, "dps"), "status": int(num(arg(2, "429"))),
			"count": int(num(arg(3, "1"))), "retryAfter": int(num(arg(4, "0")))}))
	case "assign-delay":
		return c.do("POST", "/faults/assign-delay", js(map[string]any{"seconds": num(arg(1, "0"))}))
	case "tamper":
		return c.do("POST", "/faults/tamper", js(map[string]any{"kind": arg(1, "wrong-key")}))
	case "clear":
		return c.do("DELETE", "/faults", nil)
	}
	return fmt.Errorf("unknown fault %q: %w", a[0], errUsage)
}

func (c client) ca(a []string) error {
	if len(a) >= 1 && a[0] == "list" {
		return c.do("GET", "/hub/cas", nil)
	}
	if len(a) < 3 || (a[0] != "upload" && a[0] != "verify") {
		return fmt.Errorf("ca upload|verify NAME FILE: %w", errUsage)
	}
	b, err := os.ReadFile(a[2])
	if err != nil {
		return err
	}
	path := "/hub/cas/" + url.PathEscape(a[1])
	if a[0] == "verify" {
		path += "/verify"
	}
	return c.do("POST", path, b)
}

// quota shows the hub's limits and use, sets the use, or moves the quota
// clock: `quota`, `quota set-used N`, `quota clock set TIME|advance DUR|reset`.
func (c client) quota(a []string) error {
	js := func(v map[string]any) []byte { b, _ := json.Marshal(v); return b }
	switch {
	case len(a) == 0:
		return c.do("GET", "/hub/quota", nil)
	case a[0] == "set-used" && len(a) == 2:
		n, err := strconv.ParseInt(a[1], 10, 64)
		if err != nil || n < 0 {
			return fmt.Errorf("quota set-used %q: want a number of messages >= 0: %w", a[1], errUsage)
		}
		return c.do("PUT", "/hub/quota", js(map[string]any{"used": n}))
	case a[0] == "clock" && len(a) == 3 && a[1] == "set":
		return c.do("POST", "/hub/quota/clock", js(map[string]any{"set": a[2]}))
	case a[0] == "clock" && len(a) == 3 && a[1] == "advance":
		return c.do("POST", "/hub/quota/clock", js(map[string]any{"advance": a[2]}))
	case a[0] == "clock" && len(a) == 2 && a[1] == "reset":
		return c.do("POST", "/hub/quota/clock", js(map[string]any{"reset": true}))
	}
	return fmt.Errorf("quota [set-used N | clock set TIME | clock advance DURATION | clock reset]: %w", errUsage)
}

// enroll creates an individual enrollment: `enroll tpm --registration-id ID --ek FILE`.
func (c client) enroll(a []string, stderr io.Writer) error {
	if len(a) == 0 || a[0] != "tpm" {
		return fmt.Errorf("enroll tpm --registration-id ID --ek FILE: %w", errUsage)
	}
	fs := flag.NewFlagSet("azsim enroll tpm", flag.ContinueOnError)
	fs.SetOutput(stderr)
	regID := fs.String("registration-id", "", "registration id (gwagent onboard tpm prints it)")
	ekFile := fs.String("ek", "", "file with the base64 endorsement key (TPM2B_PUBLIC)")
	disabled := fs.Bool("disabled", false, "create the enrollment disabled")
	admin := fs.String("admin", c.base, "admin API URL")
	if err := fs.Parse(a[1:]); err != nil {
		return errUsage
	}
	c.base = strings.TrimRight(*admin, "/")
	if *regID == "" || *ekFile == "" {
		return fmt.Errorf("enroll tpm needs --registration-id and --ek: %w", errUsage)
	}
	ek, err := os.ReadFile(*ekFile)
	if err != nil {
		return err
	}
	body, _ := json.Marshal(map[string]any{"endorsementKey": strings.TrimSpace(string(ek)), "enabled": !*disabled})
	return c.do("PUT", "/dps/tpm-enrollments/"+url.PathEscape(*regID), body)
}
