package dps_test

// DPS's REST endpoint against hostile and broken clients, over real TLS on
// 127.0.0.1: every answer is DPS's status with its JSON error body, nothing
// panics, slow or idle connections are cut off, goroutines come back, and
// other clients are served meanwhile.

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gwagent/gwagent/azsim/azsimtest"

	"github.com/gwagent/gwagent/azsim"
	"github.com/gwagent/gwagent/azsim/dps"
	"github.com/gwagent/gwagent/devtools/testenv"
	"github.com/gwagent/gwagent/keystore"
	"github.com/gwagent/gwagent/keystore/tpm2"
)

// rawDPS speaks HTTP/1.1 to DPS's REST endpoint byte by byte.
type rawDPS struct {
	addr string
	tc   *tls.Config
}

func newRawDPS(t *testing.T, az *azsimtest.Azsim) *rawDPS {
	pool := x509.NewCertPool()
	b, _ := os.ReadFile(az.Info.TrustBundle)
	pool.AppendCertsFromPEM(b)
	_, port, _ := net.SplitHostPort(az.Info.DPSHTTPSAddr)
	return &rawDPS{addr: "127.0.0.1:" + port, tc: &tls.Config{RootCAs: pool, ServerName: "localhost", NextProtos: []string{"http/1.1"}}}
}

// dial opens a TLS connection to DPS's REST endpoint.
//
// DPS bounds the TLS handshake with its HTTP timeout, which the attack
// tests keep short (1 s): two dozen P-384 handshakes at once under the
// race detector on two loaded cores can take longer, and DPS then rightly
// cuts one off. Such a dial is tried again (up to three times), since the
// test needs the connection to misbehave on.
func (r *rawDPS) dial(t *testing.T) *tls.Conn {
	t.Helper()
	var c *tls.Conn
	var err error
	for range 3 {
		if c, err = tls.Dial("tcp", r.addr, r.tc); err == nil {
			break
		}
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// raw writes req (the writing may fail once DPS has answered and closed)
// and reads one answer, as net/http itself may give it (not JSON).
func (r *rawDPS) raw(t *testing.T, req []byte) (*http.Response, []byte) {
	t.Helper()
	c := r.dial(t)
	c.SetDeadline(time.Now().Add(20 * time.Second))
	go c.Write(req)
	rsp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("no answer: %v", err)
	}
	b, _ := io.ReadAll(rsp.Body)
	return rsp, b
}

// roundTrip is raw for DPS's own answers, which are JSON.
func (r *rawDPS) roundTrip(t *testing.T, req []byte) (*http.Response, map[string]any) {
	t.Helper()
	rsp, b := r.raw(t, req)
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatalf("%d answer is not JSON: %q", rsp.StatusCode, b)
	}
	return rsp, m
}

// checkDPSError: DPS's error shape, errorCode/1000 = status (as
// azure-sdk-for-c's az_iot_provisioning_client.c reads it).
func checkDPSError(t *testing.T, rsp *http.Response, m map[string]any, want int, msg string) {
	t.Helper()
	code, _ := m["errorCode"].(float64)
	if rsp.StatusCode != want || int(code)/1000 != want || m["trackingId"] == nil || m["timestampUtc"] == nil ||
		!strings.HasPrefix(rsp.Header.Get("Content-Type"), "application/json") {
		t.Fatalf("got %d %s %v, want %d with a DPS error body", rsp.StatusCode, rsp.Header.Get("Content-Type"), m, want)
	}
	if got, _ := m["message"].(string); !strings.Contains(got, msg) {
		t.Fatalf("message %q does not say %q", got, msg)
	}
}

func request(method, path string, hdr map[string]string, body string) []byte {
	var b bytes.Buffer
	fmt.Fprintf(&b, "%s %s HTTP/1.1\r\nHost: localhost\r\n", method, path)
	if _, ok := hdr["Content-Length"]; !ok && hdr["Transfer-Encoding"] == "" && body != "" {
		fmt.Fprintf(&b, "Content-Length: %d\r\n", len(body))
	}
	for k, v := range hdr {
		fmt.Fprintf(&b, "%s: %s\r\n", k, v)
	}
	b.WriteString("\r\n")
	b.WriteString(body)
	return b.Bytes()
}

// symKey is the device key of regID in the default symmetric-key group.
func symKey(t *testing.T, az *azsimtest.Azsim, regID string) string {
	for _, e := range az.Server.DPS.Enrollments() {
		if e.ID == azsim.SymmetricKeyGroup {
			k, _ := dps.DeriveKey(e.PrimaryKey, regID)
			return k
		}
	}
	t.Fatal("no symmetric-key group")
	return ""
}

func TestRESTHostileRequests(t *testing.T) {
	az := azsimtest.Start(t, azsim.Config{})
	r := newRawDPS(t, az)
	scope := az.Info.IDScope
	const regID = "attack-1"
	tok := sas(scope, regID, symKey(t, az, regID), time.Now().Add(time.Hour))
	api := "?api-version=" + certAPI
	reg := "/" + scope + "/registrations/" + regID
	js := map[string]string{"Content-Type": "application/json; charset=utf-8", "Authorization": tok}
	with := func(h map[string]string, kv ...string) map[string]string {
		m := map[string]string{}
		for k, v := range h {
			m[k] = v
		}
		for i := 0; i+1 < len(kv); i += 2 {
			if kv[i+1] == "" {
				delete(m, kv[i])
			} else {
				m[kv[i]] = kv[i+1]
			}
		}
		return m
	}

	// A registration of attack-1, whose operation other devices must not see.
	rsp, m := r.roundTrip(t, request("PUT", reg+"/register"+api, js, `{"registrationId":"`+regID+`"}`))
	if rsp.StatusCode != 202 {
		t.Fatalf("register: %d %v", rsp.StatusCode, m)
	}
	opID := m["operationId"].(string)
	const other = "attack-2"
	otherTok := sas(scope, other, symKey(t, az, other), time.Now().Add(time.Hour))

	big := `{"payload":{"pad":"` + strings.Repeat("a", 100<<10) + `"}}`
	nested := `{"payload":` + strings.Repeat("[", 40000) + strings.Repeat("]", 40000) + `}`
	for _, c := range []struct {
		name, method, path string
		hdr                map[string]string
		body               string
		want               int
		msg                string
	}{
		{"malformed JSON", "PUT", reg + "/register" + api, js, `{"registrationId":`, 400, "not valid JSON"},
		{"JSON then garbage", "PUT", reg + "/register" + api, js, `{"registrationId":"attack-1"} x`, 400, "not valid JSON"},
		{"not UTF-8", "PUT", reg + "/register" + api, js, "{\"payload\":\"\xff\xfe\"", 400, "not valid JSON"},
		{"deeply nested", "PUT", reg + "/register" + api, js, nested, 400, "not valid JSON"},
		{"wrong types", "PUT", reg + "/register" + api, js, `{"registrationId":7,"csr":[]}`, 400, "not valid JSON"},
		{"body names another id", "PUT", reg + "/register" + api, js, `{"registrationId":"attack-2"}`, 400, "differs"},
		{"over 96 KB", "PUT", reg + "/register" + api, js, big, 413, "limit"},
		{"over 96 KB chunked", "PUT", reg + "/register" + api, with(js, "Transfer-Encoding", "chunked"),
			fmt.Sprintf("%x\r\n%s\r\n0\r\n\r\n", len(big), big), 413, "limit"},
		{"absurd Content-Length", "PUT", reg + "/register" + api, with(js, "Content-Length", "999999999999"), "{}", 413, "999999999999"},
		{"text/plain", "PUT", reg + "/register" + api, with(js, "Content-Type", "text/plain"), "{}", 415, "text/plain"},
		{"form", "PUT", reg + "/register" + api, with(js, "Content-Type", "application/x-www-form-urlencoded"), "a=b", 415, "application/json"},
		{"unparsable Content-Type", "PUT", reg + "/register" + api, with(js, "Content-Type", ";;;"), "{}", 415, "application/json"},
		{"no api-version", "PUT", reg + "/register", js, "{}", 400, "required"},
		{"garbage api-version", "PUT", reg + "/register?api-version=zzz", js, "{}", 400, "zzz"},
		{"api-version not a date", "PUT", reg + "/register?api-version=2025-13-45-preview", js, "{}", 400, "not a DPS api-version"},
		{"id with a slash", "PUT", "/" + scope + "/registrations/a%2F..%2Fb/register" + api, js, "{}", 400, "not allowed"},
		{"id with NUL", "PUT", "/" + scope + "/registrations/dev%00/register" + api, js, "{}", 400, "not allowed"},
		{"id with space", "PUT", "/" + scope + "/registrations/dev%201/register" + api, js, "{}", 400, "not allowed"},
		{"id ending in a dot", "PUT", "/" + scope + "/registrations/dev./register" + api, js, "{}", 400, "must end"},
		{"id of 129 characters", "PUT", "/" + scope + "/registrations/" + strings.Repeat("a", 129) + "/register" + api, js, "{}", 400, "1 to 128"},
		{"non-ASCII id", "PUT", "/" + scope + "/registrations/d%C3%A9v/register" + api, js, "{}", 400, "not allowed"},
		{"no credential", "PUT", reg + "/register" + api, with(js, "Authorization", ""), "{}", 401, "no credential"},
		{"token of another device", "PUT", reg + "/register" + api, with(js, "Authorization", otherTok), "{}", 401, "is not"},
		{"token signed with a wrong key", "PUT", reg + "/register" + api,
			with(js, "Authorization", sas(scope, regID, base64.StdEncoding.EncodeToString(make([]byte, 32)), time.Now().Add(time.Hour))), "{}", 401, "signature"},
		{"expired token", "PUT", reg + "/register" + api,
			with(js, "Authorization", sas(scope, regID, symKey(t, az, regID), time.Now().Add(-time.Minute))), "{}", 401, "expired"},
		{"malformed token", "PUT", reg + "/register" + api, with(js, "Authorization", "SharedAccessSignature sr=%zz"), "{}", 401, "malformed"},
		{"bearer token", "PUT", reg + "/register" + api, with(js, "Authorization", "Bearer x"), "{}", 401, "SharedAccessSignature"},
		{"unknown registration", "PUT", "/" + scope + "/registrations/nobody/register" + api, js, "{}", 401, "is not"},
		{"unknown operation", "GET", reg + "/operations/4.nope" + api, js, "", 404, "not found"},
		{"operation id of 8000 characters", "GET", reg + "/operations/" + strings.Repeat("x", 8000) + api, js, "", 404, "not found"},
		{"operation id with odd characters", "GET", reg + "/operations/..%2F..%2F%00" + api, js, "", 404, "not found"},
		{"another registration's operation", "GET", "/" + scope + "/registrations/" + other + "/operations/" + opID + api,
			with(js, "Authorization", otherTok), "", 404, "not found"},
		{"GET register", "GET", reg + "/register" + api, js, "", 405, "use PUT"},
		{"DELETE operation", "DELETE", reg + "/operations/" + opID + api, js, "", 405, "use GET"},
		{"unknown path", "GET", "/etc/passwd", js, "", 404, "no such resource"},
		{"registration status lookup (not emulated)", "POST", reg + api, js, "{}", 404, "no such resource"},
	} {
		t.Run(c.name, func(t *testing.T) {
			rsp, m := r.roundTrip(t, request(c.method, c.path, c.hdr, c.body))
			checkDPSError(t, rsp, m, c.want, c.msg)
			if c.want == 405 && rsp.Header.Get("Allow") == "" {
				t.Error("405 without Allow")
			}
		})
	}

	t.Run("headers over 16 KB", func(t *testing.T) {
		rsp, _ := r.raw(t, request("PUT", reg+"/register"+api, with(js, "X-Pad", strings.Repeat("p", 20<<10)), "{}"))
		if rsp.StatusCode != 431 {
			t.Fatalf("status %d, want 431", rsp.StatusCode)
		}
	})
	t.Run("two Content-Lengths", func(t *testing.T) {
		req := request("PUT", reg+"/register"+api, with(js, "Content-Length", "2\r\nContent-Length: 3"), "{}")
		if rsp, _ := r.raw(t, req); rsp.StatusCode != 400 {
			t.Fatalf("status %d, want 400", rsp.StatusCode)
		}
	})
	// After all that, the registration still completes.
	c := restClient(t, az, 0)
	testenv.Eventually(t, 10*time.Second, "attack-1 assigned", func() bool {
		st, _, body := rest(t, c, "GET", "https://"+az.Info.DPSHTTPSAddr+reg+"/operations/"+opID+api, tok, nil)
		return st == 200 && body["status"] == "assigned"
	})
}

// closedByServer waits until DPS closes c: a read ends with EOF or a
// reset, not with the test's own (generous) deadline.
func closedByServer(t *testing.T, c net.Conn, what string) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(20 * time.Second))
	_, err := io.Copy(io.Discard, c)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("%s: DPS kept the connection open for 20 s", what)
	}
}

// Slow, stuck and idle clients are cut off (DPSHTTPTimeout, short here so
// the test is quick; it does not depend on how quick), their goroutines
// end, and DPS serves others all the while.
func TestRESTSlowClients(t *testing.T) {
	az := azsimtest.Start(t, azsim.Config{DPSHTTPTimeout: time.Second})
	r := newRawDPS(t, az)
	scope := az.Info.IDScope
	const regID = "slow-1"
	tok := sas(scope, regID, symKey(t, az, regID), time.Now().Add(time.Hour))
	path := "/" + scope + "/registrations/" + regID + "/register?api-version=" + certAPI
	client := &http.Client{Timeout: 20 * time.Second, Transport: &http.Transport{TLSClientConfig: r.tc, DisableKeepAlives: true}}
	served := func() {
		t.Helper()
		// Up to three tries, as a client would: on a busy machine (the
		// race detector, the suite on two cores) a handshake can outlast
		// the second this DPS allows, and the connection is cut.
		var rsp *http.Response
		var err error
		for range 3 {
			req, _ := http.NewRequest("PUT", "https://"+r.addr+path, strings.NewReader("{}"))
			req.Header.Set("Authorization", tok)
			req.Host = "localhost"
			if rsp, err = client.Do(req); err == nil {
				break
			}
		}
		if err != nil {
			t.Fatalf("a well-behaved client is not served: %v", err)
		}
		rsp.Body.Close()
		if rsp.StatusCode != 202 {
			t.Fatalf("a well-behaved client got %d", rsp.StatusCode)
		}
	}
	served()
	base := runtime.NumGoroutine()

	var wg sync.WaitGroup
	run := func(name string, f func(t *testing.T)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			t.Run(name, f)
		}()
	}
	for i := range 20 {
		run("slowloris "+strconv.Itoa(i), func(t *testing.T) {
			c := r.dial(t)
			head := request("PUT", path, map[string]string{"Authorization": tok}, "")
			// Dribble the headers a byte at a time, never finishing them.
			go func() {
				for _, b := range head[:len(head)-2] {
					if _, err := c.Write([]byte{b}); err != nil {
						return
					}
					time.Sleep(50 * time.Millisecond)
				}
			}()
			closedByServer(t, c, "headers dribbled in")
		})
	}
	run("body that never ends", func(t *testing.T) {
		c := r.dial(t)
		c.Write(request("PUT", path, map[string]string{"Authorization": tok, "Transfer-Encoding": "chunked"}, "2\r\n{}\r\n"))
		// DPS gives up reading the body; the answer, if any, is an error.
		c.SetReadDeadline(time.Now().Add(20 * time.Second))
		if rsp, err := http.ReadResponse(bufio.NewReader(c), nil); err == nil && rsp.StatusCode != 400 {
			t.Errorf("unfinished body answered %d", rsp.StatusCode)
		}
		closedByServer(t, c, "unfinished chunked body")
	})
	run("body shorter than its Content-Length", func(t *testing.T) {
		c := r.dial(t)
		c.Write(request("PUT", path, map[string]string{"Authorization": tok, "Content-Length": "90000"}, "{"))
		closedByServer(t, c, "short body")
	})
	run("no TLS handshake", func(t *testing.T) {
		c, err := net.Dial("tcp", r.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		closedByServer(t, c, "silent TCP connection")
	})
	run("idle keep-alive", func(t *testing.T) {
		c := r.dial(t)
		c.Write(request("PUT", path, map[string]string{"Authorization": tok}, "{}"))
		rsp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil || rsp.StatusCode != 202 {
			t.Fatalf("%v %v", rsp, err)
		}
		io.Copy(io.Discard, rsp.Body)
		closedByServer(t, c, "idle keep-alive connection")
	})
	run("answers never read", func(t *testing.T) {
		// A small receive buffer, and requests pipelined without reading
		// a byte of the answers: DPS's writes stall, and it must give up.
		// The handshake is tried three times, as rawDPS.dial does: with
		// the suite busy it can outlast the second DPS allows it.
		var c *tls.Conn
		var err error
		for range 3 {
			var tc net.Conn
			if tc, err = net.Dial("tcp", r.addr); err != nil {
				continue
			}
			tc.(*net.TCPConn).SetReadBuffer(4096)
			c = tls.Client(tc, r.tc)
			if err = c.Handshake(); err == nil {
				break
			}
			c.Close()
		}
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		// Unknown operations with long ids (as long as DPS's header limit
		// lets through): every 404 echoes the id, so DPS's socket buffers
		// fill after a few hundred answers. How soon depends on how fast
		// DPS answers: with the race detector on two cores busy with the
		// rest of the suite, five times slower than alone, hence the
		// minute before the verdict.
		poll := request("GET", "/"+scope+"/registrations/"+regID+"/operations/"+strings.Repeat("x", 12000)+"?api-version="+certAPI, nil, "")
		batch := bytes.Repeat(poll, 10)
		c.SetWriteDeadline(time.Now().Add(time.Minute))
		sent := 0
		for {
			if _, err := c.Write(batch); err != nil {
				var ne net.Error
				if errors.As(err, &ne) && ne.Timeout() {
					t.Fatalf("DPS kept writing to (or waiting on) a client that reads nothing for a minute (%d requests taken)", sent)
				}
				t.Logf("DPS closed the connection after %d requests: %v", sent, err)
				return // DPS closed the connection
			}
			sent += 10
		}
	})
	// Others are served while the slow clients hang on.
	for range 5 {
		served()
	}
	wg.Wait()
	client.CloseIdleConnections()
	testenv.Eventually(t, 20*time.Second, "goroutines back to their number before the slow clients", func() bool {
		return runtime.NumGoroutine() <= base+2
	})
}

// Many simultaneous registrations of one device: each gets its own
// operation, all are assigned to the same device, the count is right in
// memory and on disk.
func TestRESTConcurrentRegistrations(t *testing.T) {
	az := azsimtest.Start(t, azsim.Config{DPSPollLimit: -1})
	c := restClient(t, az, 0)
	const regID, n = "crowd-1", 16
	tok := sas(az.Info.IDScope, regID, symKey(t, az, regID), time.Now().Add(time.Hour))
	base := "https://" + az.Info.DPSHTTPSAddr + "/" + az.Info.IDScope + "/registrations/" + regID
	api := "?api-version=" + certAPI
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			st, _, body := rest(t, c, "PUT", base+"/register"+api, tok, map[string]any{"registrationId": regID})
			op, _ := body["operationId"].(string)
			if st != 202 || op == "" {
				errs <- fmt.Errorf("register: %d %v", st, body)
				return
			}
			for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
				st, _, body = rest(t, c, "GET", base+"/operations/"+op+api, tok, nil)
				if st != 202 {
					break
				}
			}
			rs, _ := body["registrationState"].(map[string]any)
			if st != 200 || body["status"] != "assigned" || rs["deviceId"] != regID {
				errs <- fmt.Errorf("poll: %d %v", st, body)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	var count int
	for _, reg := range az.Server.DPS.Registrations() {
		if reg.RegistrationID == regID {
			count = reg.Count
		}
	}
	if count != n {
		t.Fatalf("registration count %d, want %d", count, n)
	}
	var disk struct {
		Registrations map[string]dps.Registration `json:"registrations"`
	}
	b, err := os.ReadFile(az.Dir + "/state/dps/dps.json")
	if err != nil || json.Unmarshal(b, &disk) != nil {
		t.Fatalf("dps.json: %v", err)
	}
	if got := disk.Registrations[regID].Count; got != n {
		t.Fatalf("dps.json says %d registrations, want %d: an older save overwrote a newer one", got, n)
	}
}

// TPM attestation over REST with a real swtpm, attacked: garbage and
// damaged keys, wrong, expired and replayed SAS tokens, polls with another
// challenge's token.
func TestRESTTPMHostile(t *testing.T) {
	ctx := context.Background()
	sw := testenv.StartSWTPM(t)
	ks, err := tpm2.Open(ctx, keystore.MustParse("tpm2:socket="+sw.Sock+";blob=/unused"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ks.Close() })
	store := ks.(*tpm2.Store)
	ek, srk, err := store.DPSPublics(ctx)
	if err != nil {
		t.Fatal(err)
	}
	az := azsimtest.Start(t, azsim.Config{})
	const regID = "tpm-attack-1"
	if err := az.Server.DPS.PutTPMEnrollment(dps.TPMEnrollment{RegistrationID: regID, EndorsementKey: base64.StdEncoding.EncodeToString(ek), Enabled: true}); err != nil {
		t.Fatal(err)
	}
	c := restClient(t, az, 0)
	scope := az.Info.IDScope
	base := "https://" + az.Info.DPSHTTPSAddr + "/" + scope + "/registrations/" + regID
	api := "?api-version=" + certAPI
	b64 := base64.StdEncoding.EncodeToString
	tpmBody := func(ek, srk string) map[string]any {
		return map[string]any{"registrationId": regID, "tpm": map[string]string{"endorsementKey": ek, "storageRootKey": srk}}
	}
	// token signs a SAS for regID with the TPM, using challenge blob.
	token := func(blob []byte, exp time.Time) string {
		sr := url.QueryEscape(scope + "/registrations/" + regID)
		sig, err := store.DPSSign(ctx, blob, []byte(sr+"\n"+strconv.FormatInt(exp.Unix(), 10)))
		if err != nil {
			t.Fatal(err)
		}
		return "SharedAccessSignature sr=" + sr + "&sig=" + url.QueryEscape(b64(sig)) + "&se=" + strconv.FormatInt(exp.Unix(), 10) + "&skn=registration"
	}
	challenge := func() []byte {
		t.Helper()
		st, _, body := rest(t, c, "PUT", base+"/register"+api, "", tpmBody(b64(ek), b64(srk)))
		k, _ := body["authenticationKey"].(string)
		blob, err := base64.StdEncoding.DecodeString(k)
		if st != 401 || err != nil || len(blob) == 0 {
			t.Fatalf("challenge: %d %v", st, body)
		}
		return blob
	}
	// symBits patches the SRK's AES key size (TPMT_PUBLIC after the size:
	// type, nameAlg, attributes, authPolicy, then the symmetric algorithm).
	symBits := func(bits uint16) []byte {
		b := append([]byte(nil), srk...)
		off := 12 + int(binary.BigEndian.Uint16(b[10:12])) + 2
		binary.BigEndian.PutUint16(b[off:], bits)
		return b
	}
	for _, c2 := range []struct {
		name     string
		ek, srk  string
		want     int
		msg      string
		noChalng bool
	}{
		{"EK not base64", "%%%", b64(srk), 401, "does not match", true},
		{"EK of another TPM", b64(srk), b64(srk), 401, "does not match", true},
		{"SRK not base64", b64(ek), "***", 400, "not base64", true},
		{"SRK empty", b64(ek), "", 400, "storageRootKey", true},
		{"SRK truncated", b64(ek), b64(srk[:len(srk)-10]), 400, "storageRootKey", true},
		{"SRK with an AES-64 key", b64(ek), b64(symBits(64)), 400, "AES-64", true},
		{"SRK with an AES-0 key", b64(ek), b64(symBits(0)), 400, "AES-0", true},
	} {
		t.Run(c2.name, func(t *testing.T) {
			st, _, body := rest(t, c, "PUT", base+"/register"+api, "", tpmBody(c2.ek, c2.srk))
			msg, _ := body["message"].(string)
			code, _ := body["errorCode"].(float64)
			if st != c2.want || int(code)/1000 != c2.want || !strings.Contains(msg, c2.msg) || body["authenticationKey"] != nil {
				t.Fatalf("%d %v, want %d about %q without a challenge", st, body, c2.want, c2.msg)
			}
		})
	}

	t.Run("SAS before any challenge", func(t *testing.T) {
		const fresh = "tpm-attack-2"
		if err := az.Server.DPS.PutTPMEnrollment(dps.TPMEnrollment{RegistrationID: fresh, EndorsementKey: b64(ek), Enabled: true}); err != nil {
			t.Fatal(err)
		}
		u := "https://" + az.Info.DPSHTTPSAddr + "/" + scope + "/registrations/" + fresh + "/register" + api
		st, _, body := rest(t, c, "PUT", u, "SharedAccessSignature sr=x&sig=AAAA&se=9999999999&skn=registration",
			map[string]any{"tpm": map[string]string{"endorsementKey": b64(ek), "storageRootKey": b64(srk)}})
		if st != 401 || !strings.Contains(fmt.Sprint(body["message"]), "no challenge") {
			t.Fatalf("%d %v", st, body)
		}
	})

	blob1 := challenge()
	good1 := token(blob1, time.Now().Add(time.Hour))
	for name, tok := range map[string]string{
		"SAS signed with a wrong key": sas(scope, regID, b64(make([]byte, 32)), time.Now().Add(time.Hour)),
		"expired SAS":                 token(blob1, time.Now().Add(-time.Minute)),
		"malformed SAS":               "SharedAccessSignature sig=&&&",
		"SAS for another device":      strings.Replace(good1, "tpm-attack-1", "tpm-attack-9", 1),
	} {
		t.Run(name, func(t *testing.T) {
			if st, _, body := rest(t, c, "PUT", base+"/register"+api, tok, tpmBody(b64(ek), b64(srk))); st != 401 || body["errorCode"] != float64(401002) {
				t.Fatalf("%d %v", st, body)
			}
		})
	}

	st, _, body := rest(t, c, "PUT", base+"/register"+api, good1, tpmBody(b64(ek), b64(srk)))
	op1, _ := body["operationId"].(string)
	if st != 202 || op1 == "" {
		t.Fatalf("register with the TPM's SAS: %d %v", st, body)
	}
	// Someone who knows the (public) EK asks for a new challenge: the
	// first one's token no longer registers, but the operation it started
	// still answers to it and names the challenge the device answered.
	blob2 := challenge()
	t.Run("replayed SAS of an older challenge", func(t *testing.T) {
		if st, _, body := rest(t, c, "PUT", base+"/register"+api, good1, tpmBody(b64(ek), b64(srk))); st != 401 {
			t.Fatalf("%d %v", st, body)
		}
	})
	t.Run("poll with another challenge's SAS", func(t *testing.T) {
		if st, _, body := rest(t, c, "GET", base+"/operations/"+op1+api, token(blob2, time.Now().Add(time.Hour)), nil); st != 401 {
			t.Fatalf("%d %v", st, body)
		}
	})
	t.Run("poll without SAS", func(t *testing.T) {
		if st, _, body := rest(t, c, "GET", base+"/operations/"+op1+api, "", nil); st != 401 {
			t.Fatalf("%d %v", st, body)
		}
	})
	testenv.Eventually(t, 10*time.Second, "TPM registration assigned", func() bool {
		st, _, body = rest(t, c, "GET", base+"/operations/"+op1+api, good1, nil)
		return st == 200
	})
	rs, _ := body["registrationState"].(map[string]any)
	tpmState, _ := rs["tpm"].(map[string]any)
	if body["status"] != "assigned" || tpmState["authenticationKey"] != b64(blob1) {
		t.Fatalf("outcome %v does not name the challenge the device answered", body)
	}
}

// Enrollments whose id no device could register with are refused.
func TestEnrollmentIDs(t *testing.T) {
	az := azsimtest.Start(t, azsim.Config{})
	var tpmErr map[string]string
	if st := az.Admin("PUT", "/dps/tpm-enrollments/dev.", map[string]string{"endorsementKey": "AAAA"}, &tpmErr); st != 400 || !strings.Contains(tpmErr["error"], "must end") {
		t.Fatalf("TPM enrollment dev.: %d %v", st, tpmErr)
	}
	err := az.Server.DPS.PutEnrollment(dps.Enrollment{ID: "a/b", Kind: dps.KindSymmetricKey, Individual: true, Enabled: true,
		PrimaryKey: base64.StdEncoding.EncodeToString(make([]byte, 32))})
	if err == nil || !strings.Contains(err.Error(), "not allowed") {
		t.Fatalf("individual enrollment a/b: %v", err)
	}
}

// The same registration id and api-version rules hold over MQTT.
func TestMQTTRegisterRules(t *testing.T) {
	az := azsimtest.Start(t, azsim.Config{})
	for _, c := range []struct{ regID, api, msg string }{
		{"dev.", certAPI, "must end"},
		{"dev+1", certAPI, "not allowed"},
		{"mqtt-1", "zzz", "not a DPS api-version"},
	} {
		t.Run(c.regID+" "+c.api, func(t *testing.T) {
			cl, err := connect(t, az, c.regID, c.api, nil, sas(az.Info.IDScope, c.regID, symKey(t, az, c.regID), time.Now().Add(time.Hour)))
			if err != nil {
				t.Fatal(err)
			}
			r := cl.request("$dps/registrations/PUT/iotdps-register/?$rid=1", map[string]any{})
			if r.status != 400 || !strings.Contains(fmt.Sprint(r.body["message"]), c.msg) {
				t.Fatalf("%d %v, want 400 about %q", r.status, r.body, c.msg)
			}
		})
	}
}
