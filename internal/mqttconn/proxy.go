package mqttconn

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"
)

// ErrProxy marks every failure of the HTTP proxy: unreachable, refusing
// the tunnel (407, 403, ...) or closing it.
var ErrProxy = errors.New("proxy")

// ProxyFunc returns the proxy to reach target (host:port) through, or nil
// to connect directly.
type ProxyFunc func(target string) (*url.URL, error)

// ParseProxy checks a proxy URL as written in the config or in https_proxy:
// http://[user:password@]host[:port] (port default 80; a bare host:port is
// taken as http). The error never contains the password.
func ParseProxy(s string) (*url.URL, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return nil, nil
	}
	if !strings.Contains(s, "://") {
		s = "http://" + s
	}
	const encode = "; percent-encode @ # / ? % : in a user name or password (%40 %23 %2F %3F %25 %3A)"
	u, err := url.Parse(s)
	if err != nil {
		// url's errors quote the whole input, password included.
		return nil, errors.New("proxy: not a URL; write it as http://[user:password@]host:port" + encode)
	}
	if u.Path != "" && u.Path != "/" || u.RawQuery != "" || u.Fragment != "" || u.Opaque != "" {
		// A password with an unencoded / ? or # lands here, cut in two: its
		// start in the host, its end in the path. Show none of it.
		return nil, errors.New("proxy: a proxy URL has no path, query or fragment (write http://[user:password@]host:port)" + encode)
	}
	shown := (&url.URL{Scheme: u.Scheme, User: u.User, Host: u.Host}).Redacted()
	if u.Scheme != "http" {
		return nil, fmt.Errorf("proxy %s: scheme %q is not supported; use an http:// proxy (the tunnel inside is TLS either way)", shown, u.Scheme)
	}
	if u.Hostname() == "" {
		return nil, fmt.Errorf("proxy %s: no host", shown)
	}
	if u.Port() == "" {
		u.Host = net.JoinHostPort(u.Hostname(), "80")
	} else if p, err := strconv.Atoi(u.Port()); err != nil || p < 1 || p > 65535 {
		return nil, fmt.Errorf("proxy %s: port %s is not 1-65535", shown, u.Port())
	}
	u.Path = ""
	return u, nil
}

// Proxy returns a ProxyFunc that sends every target through proxy except
// those noProxy names. noProxy is a comma- or space-separated list in the
// curl/Go style: "*" (all), a host name (which matches it and its
// subdomains; a leading dot is allowed), an IP address, a CIDR block, each
// optionally with ":port". Unlike Go's net/http, loopback addresses are not
// exempt unless listed: a proxy named here is used as written.
func Proxy(proxy *url.URL, noProxy string) ProxyFunc {
	if proxy == nil {
		return nil
	}
	rules := parseNoProxy(noProxy)
	return func(target string) (*url.URL, error) {
		if rules.match(target) {
			return nil, nil
		}
		return proxy, nil
	}
}

// ProxyFromEnvironment reads https_proxy, HTTPS_PROXY, no_proxy and
// NO_PROXY through getenv (lower case first, as curl does), as the Azure IoT
// Identity Service and systemd drop-ins set them. No https_proxy: no proxy.
func ProxyFromEnvironment(getenv func(string) string) (ProxyFunc, error) {
	first := func(names ...string) string {
		for _, n := range names {
			if v := getenv(n); v != "" {
				return v
			}
		}
		return ""
	}
	u, err := ParseProxy(first("https_proxy", "HTTPS_PROXY"))
	if err != nil {
		return nil, fmt.Errorf("https_proxy: %w", err)
	}
	return Proxy(u, first("no_proxy", "NO_PROXY")), nil
}

type noProxyRules struct {
	all   bool
	hosts []hostRule
	nets  []*net.IPNet
}

type hostRule struct{ host, port string }

func parseNoProxy(s string) noProxyRules {
	var r noProxyRules
	for _, f := range strings.FieldsFunc(s, func(c rune) bool { return c == ',' || c == ' ' }) {
		f = strings.ToLower(strings.TrimSpace(f))
		if f == "*" {
			r.all = true
			continue
		}
		if _, n, err := net.ParseCIDR(f); err == nil {
			r.nets = append(r.nets, n)
			continue
		}
		h, p := f, ""
		if hh, pp, err := net.SplitHostPort(f); err == nil {
			h, p = hh, pp
		}
		h = strings.TrimPrefix(strings.TrimPrefix(h, "*"), ".")
		if h != "" {
			r.hosts = append(r.hosts, hostRule{host: strings.Trim(h, "[]"), port: p})
		}
	}
	return r
}

func (r noProxyRules) match(target string) bool {
	if r.all {
		return true
	}
	host, port, err := net.SplitHostPort(target)
	if err != nil {
		host = target
	}
	host = strings.ToLower(strings.TrimSuffix(host, "."))
	if ip := net.ParseIP(host); ip != nil {
		for _, n := range r.nets {
			if n.Contains(ip) {
				return true
			}
		}
	}
	for _, h := range r.hosts {
		if h.port != "" && h.port != port {
			continue
		}
		if host == h.host || strings.HasSuffix(host, "."+h.host) {
			return true
		}
	}
	return false
}

// ProxyError is a proxy that could not be reached or would not open the
// tunnel. Proxy is the proxy's URL without its password.
type ProxyError struct {
	Proxy  string
	Target string
	// Status is the proxy's HTTP answer to CONNECT; 0 when there was none.
	Status int
	// Closed: the proxy closed the connection instead of answering, or
	// (Silent) did not answer in time.
	Closed bool
	Silent bool
	// Auth are the schemes a 407 offers (Proxy-Authenticate), when none
	// is Basic, the only one gwagent speaks.
	Auth []string
	// TooLong: the answer to CONNECT went on past any sane size.
	TooLong bool
	// NoUser: the proxy URL has no user (so no credentials were sent).
	NoUser bool
	Err    error
}

func (e *ProxyError) Error() string {
	switch {
	case e.authFailed() && len(e.Auth) > 0:
		return fmt.Sprintf("proxy %s refused CONNECT to %s: %d %s; it asks for %s authentication, and gwagent speaks only Basic: ask for an account with Basic authentication or an exemption for this gateway", e.Proxy, e.Target, e.Status, http.StatusText(e.Status), strings.Join(e.Auth, ", "))
	case e.TooLong:
		return fmt.Sprintf("proxy %s answered CONNECT to %s with more than %d bytes of headers; it is not an HTTP proxy, or a broken one", e.Proxy, e.Target, maxConnectResponse)
	case e.authFailed() && e.NoUser:
		return fmt.Sprintf("proxy %s refused CONNECT to %s: %d %s; it needs a user name and password: write the proxy as http://user:password@host:port", e.Proxy, e.Target, e.Status, http.StatusText(e.Status))
	case e.authFailed():
		return fmt.Sprintf("proxy %s refused CONNECT to %s: %d %s; check the user name and password in the proxy setting", e.Proxy, e.Target, e.Status, http.StatusText(e.Status))
	case e.Status == 403:
		return fmt.Sprintf("proxy %s refused CONNECT to %s: 403 Forbidden; the proxy does not allow tunnels to this port (many allow only 443: use transport \"websocket\" or \"auto\")", e.Proxy, e.Target)
	case e.Status != 0:
		return fmt.Sprintf("proxy %s refused CONNECT to %s: %d %s", e.Proxy, e.Target, e.Status, http.StatusText(e.Status))
	case e.Silent:
		return fmt.Sprintf("proxy %s did not answer CONNECT to %s in time: %v", e.Proxy, e.Target, e.Err)
	case e.Closed:
		return fmt.Sprintf("proxy %s closed the tunnel to %s: %v", e.Proxy, e.Target, e.Err)
	}
	return fmt.Sprintf("proxy %s unreachable: %v; check the proxy setting (https_proxy) and that the proxy runs", e.Proxy, e.Err)
}

// authFailed: 407, or 401 as some proxies (tinyproxy) answer a wrong
// password.
func (e *ProxyError) authFailed() bool { return e.Status == 407 || e.Status == 401 }

func (e *ProxyError) Unwrap() []error {
	if e.Err == nil {
		return []error{ErrProxy}
	}
	return []error{ErrProxy, e.Err}
}

// tunnel opens a TCP connection to target through the proxy's CONNECT
// method, with Basic authentication when the proxy URL has a user.
func tunnel(ctx context.Context, proxy *url.URL, target string, dial func(context.Context, string, string) (net.Conn, error)) (net.Conn, error) {
	pe := &ProxyError{Proxy: proxy.Redacted(), Target: target, NoUser: proxy.User == nil}
	c, err := dial(ctx, "tcp", proxy.Host)
	if err != nil {
		pe.Err = err
		return nil, pe
	}
	// The context bounds the exchange: a deadline, and a cancel that
	// unblocks the read.
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { _ = c.SetDeadline(time.Unix(1, 0)) })
	defer stop()

	req := &http.Request{
		Method: http.MethodConnect,
		URL:    &url.URL{Opaque: target},
		Host:   target,
		Header: http.Header{"User-Agent": {"gwagent"}},
	}
	if u := proxy.User; u != nil {
		pw, _ := u.Password()
		req.Header.Set("Proxy-Authorization", "Basic "+base64.StdEncoding.EncodeToString([]byte(u.Username()+":"+pw)))
	}
	if err := req.Write(c); err != nil {
		c.Close()
		pe.Closed, pe.Err = true, err
		return nil, pe
	}
	// A proxy's answer is a few hundred bytes; cap it so a broken or
	// hostile proxy cannot make us buffer without end.
	lr := &io.LimitedReader{R: c, N: maxConnectResponse}
	br := bufio.NewReader(lr)
	resp, err := http.ReadResponse(br, req)
	if err != nil {
		c.Close()
		pe.TooLong = lr.N == 0
		var ne net.Error
		if ctx.Err() != nil || errors.As(err, &ne) && ne.Timeout() {
			pe.Silent = true
		}
		pe.Closed, pe.Err = true, err
		return nil, pe
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		c.Close()
		pe.Status = resp.StatusCode
		if pe.authFailed() {
			pe.Auth = nonBasic(resp.Header.Values("Proxy-Authenticate"))
		}
		return nil, pe
	}
	if !stop() {
		c.Close()
		return nil, ctx.Err()
	}
	_ = c.SetDeadline(time.Time{})
	if n := br.Buffered(); n > 0 {
		// Bytes after the answer belong to the tunnel (a server never
		// speaks first in TLS, but keep them if a proxy sent them).
		early, _ := br.Peek(n)
		return &bufferedConn{Conn: c, r: io.MultiReader(bytes.NewReader(bytes.Clone(early)), c)}, nil
	}
	return c, nil
}

// nonBasic returns the schemes challenges offer, or nil if Basic is one
// of them (or none is named).
func nonBasic(challenges []string) []string {
	var schemes []string
	for _, c := range challenges {
		// "NTLM", "Negotiate", `Basic realm="x"`, `Digest realm="x", qop=...`
		for _, part := range strings.Split(c, ",") {
			f := strings.Fields(part)
			if len(f) == 0 || strings.Contains(f[0], "=") {
				continue // a parameter of the previous scheme
			}
			if strings.EqualFold(f[0], "Basic") {
				return nil
			}
			if len(schemes) < 4 && len(f[0]) <= 32 {
				schemes = append(schemes, f[0])
			}
		}
	}
	return schemes
}

// maxConnectResponse bounds the proxy's answer to CONNECT.
const maxConnectResponse = 64 << 10

type bufferedConn struct {
	net.Conn
	r io.Reader
}

func (b *bufferedConn) Read(p []byte) (int, error) { return b.r.Read(p) }
