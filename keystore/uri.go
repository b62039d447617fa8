package keystore

import (
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
)

// Key URI grammar. The scheme picks the backend:
//
//	file:/var/lib/gwagent/keys/device.key        (also file:///var/...)
//	tpm2:device=/dev/tpmrm0;handle=0x81000100
//	tpm2:socket=/run/swtpm/sock;blob=/var/lib/gwagent/keys/device.tpmkey
//	pkcs11:token=gw;object=device-key?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=/run/credentials/gwagent.service/pin
//
// file: the path of a PEM file holding the private key. Relative paths are
// taken as they are (relative to the working directory).
//
// tpm2: path attributes separated by ';'. device= names the TPM character
// device (default /dev/tpmrm0); socket= names a swtpm Unix socket instead
// (tests, demos). The key lives at a persistent handle= (0x81000000 to
// 0x81FFFFFF) and/or in a key blob file blob= (public and private parts, the
// private part wrapped by the TPM's storage root key). At least one of handle
// and blob is required.
//
// pkcs11: RFC 7512. Path attributes (';'): token, manufacturer, serial, model,
// library-manufacturer, library-description, library-version, object, type,
// id, slot-manufacturer, slot-description, slot-id, and vendor "x-" attributes.
// Query attributes ('&'): module-path (required), module-name, pin-source (a
// file holding the PIN; systemd credentials are such files) or pin-value.
// One of token, serial or slot-id selects the token; object or id the key.
// pin-value never appears in String() output or in errors.

// Scheme names.
const (
	SchemeFile   = "file"
	SchemeTPM2   = "tpm2"
	SchemePKCS11 = "pkcs11"
)

// URI is a parsed, validated key URI. Use Parse to make one.
type URI struct {
	Scheme string
	// Path is the file path for file: URIs and empty otherwise.
	Path string
	// Attrs are the path attributes (before '?'), decoded.
	Attrs map[string]string
	// Query are the query attributes (after '?'), decoded.
	Query map[string]string
}

var (
	tpmAttrs    = set("device", "socket", "handle", "blob")
	pkcs11Attrs = set("token", "manufacturer", "serial", "model", "library-manufacturer",
		"library-description", "library-version", "object", "type", "id",
		"slot-manufacturer", "slot-description", "slot-id")
	pkcs11Query = set("module-path", "module-name", "pin-source", "pin-value")
)

func set(names ...string) map[string]bool {
	m := make(map[string]bool, len(names))
	for _, n := range names {
		m[n] = true
	}
	return m
}

// Parse parses and validates a key URI. Errors wrap ErrBadURI or
// ErrUnknownScheme and never repeat a pin-value.
func Parse(raw string) (*URI, error) {
	raw = strings.TrimSpace(raw)
	scheme, rest, ok := strings.Cut(raw, ":")
	if !ok || scheme == "" {
		return nil, fmt.Errorf("%w: %q has no scheme; use file:, tpm2: or pkcs11:", ErrBadURI, redactRaw(raw))
	}
	u := &URI{Scheme: strings.ToLower(scheme), Attrs: map[string]string{}, Query: map[string]string{}}
	switch u.Scheme {
	case SchemeFile:
		p := rest
		if strings.HasPrefix(p, "//") {
			p = strings.TrimPrefix(p, "//")
			host, path, _ := strings.Cut(p, "/")
			if host != "" && host != "localhost" {
				return nil, fmt.Errorf("%w: file URI %q names host %q; use file:/absolute/path", ErrBadURI, raw, host)
			}
			p = "/" + path
		}
		dec, err := url.PathUnescape(p)
		if err != nil || dec == "" || strings.HasSuffix(dec, "/") {
			return nil, fmt.Errorf("%w: file URI %q needs a key file path, e.g. file:/var/lib/gwagent/keys/device.key", ErrBadURI, raw)
		}
		u.Path = dec
		return u, nil
	case SchemeTPM2:
		if err := parseAttrs(rest, u, tpmAttrs, nil); err != nil {
			return nil, err
		}
		return u, u.validateTPM()
	case SchemePKCS11:
		if err := parseAttrs(rest, u, pkcs11Attrs, pkcs11Query); err != nil {
			return nil, err
		}
		return u, u.validatePKCS11()
	default:
		return nil, fmt.Errorf("%w %q: use file:, tpm2: or pkcs11:", ErrUnknownScheme, scheme)
	}
}

// MustParse is Parse for constants in tests and examples; it panics on error.
func MustParse(raw string) *URI {
	u, err := Parse(raw)
	if err != nil {
		panic(err)
	}
	return u
}

func parseAttrs(rest string, u *URI, pathOK, queryOK map[string]bool) error {
	path, query, hasQuery := strings.Cut(rest, "?")
	if hasQuery && queryOK == nil {
		return fmt.Errorf("%w: %s URIs take no query part; separate attributes with ';'", ErrBadURI, u.Scheme)
	}
	if err := splitInto(path, ";", u.Attrs, pathOK, u.Scheme, "path"); err != nil {
		return err
	}
	if hasQuery {
		return splitInto(query, "&", u.Query, queryOK, u.Scheme, "query")
	}
	return nil
}

func splitInto(s, sep string, into map[string]string, allowed map[string]bool, scheme, part string) error {
	if s == "" {
		return nil
	}
	for _, kv := range strings.Split(s, sep) {
		if kv == "" {
			continue
		}
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			return fmt.Errorf("%w: %s attribute %q has no '=value'", ErrBadURI, scheme, k)
		}
		k = strings.ToLower(k)
		if !allowed[k] && !strings.HasPrefix(k, "x-") {
			return fmt.Errorf("%w: unknown %s %s attribute %q (known: %s)", ErrBadURI, scheme, part, k, keys(allowed))
		}
		dec, err := url.PathUnescape(v)
		if err != nil {
			return fmt.Errorf("%w: %s attribute %q is not valid percent-encoding", ErrBadURI, scheme, k)
		}
		if _, dup := into[k]; dup {
			return fmt.Errorf("%w: %s attribute %q given twice", ErrBadURI, scheme, k)
		}
		into[k] = dec
	}
	return nil
}

func keys(m map[string]bool) string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return strings.Join(out, ", ")
}

func (u *URI) validateTPM() error {
	if u.Attrs["device"] != "" && u.Attrs["socket"] != "" {
		return fmt.Errorf("%w: tpm2 URI names both device= and socket=; give one", ErrBadURI)
	}
	if u.Attrs["handle"] == "" && u.Attrs["blob"] == "" {
		return fmt.Errorf("%w: tpm2 URI needs handle=0x81...... or blob=/path/to/key (or both)", ErrBadURI)
	}
	if h := u.Attrs["handle"]; h != "" {
		if _, err := u.Handle(); err != nil {
			return err
		}
	}
	return nil
}

// Handle returns the TPM persistent handle of a tpm2: URI, or 0 if none.
func (u *URI) Handle() (uint32, error) {
	h := u.Attrs["handle"]
	if h == "" {
		return 0, nil
	}
	v, err := strconv.ParseUint(strings.TrimPrefix(strings.ToLower(h), "0x"), 16, 32)
	if err != nil || v < 0x81000000 || v > 0x81FFFFFF {
		return 0, fmt.Errorf("%w: tpm2 handle %q must be a persistent handle 0x81000000..0x81FFFFFF", ErrBadURI, h)
	}
	return uint32(v), nil
}

// TPMDevice returns the TPM to use: the socket path (socket=true) or the
// character device, defaulting to /dev/tpmrm0.
func (u *URI) TPMDevice() (path string, socket bool) {
	if s := u.Attrs["socket"]; s != "" {
		return s, true
	}
	if d := u.Attrs["device"]; d != "" {
		return d, false
	}
	return "/dev/tpmrm0", false
}

func (u *URI) validatePKCS11() error {
	if u.Query["module-path"] == "" {
		return fmt.Errorf("%w: pkcs11 URI needs ?module-path=/path/to/module.so (e.g. /usr/lib/softhsm/libsofthsm2.so)", ErrBadURI)
	}
	if u.Attrs["token"] == "" && u.Attrs["serial"] == "" && u.Attrs["slot-id"] == "" {
		return fmt.Errorf("%w: pkcs11 URI needs token=LABEL (or serial= or slot-id=) to select the token", ErrBadURI)
	}
	if u.Attrs["object"] == "" && u.Attrs["id"] == "" {
		return fmt.Errorf("%w: pkcs11 URI needs object=LABEL (or id=) to name the key", ErrBadURI)
	}
	if t := u.Attrs["type"]; t != "" && t != "private" {
		return fmt.Errorf("%w: pkcs11 URI type=%q: gwagent keys are type=private (or leave type out)", ErrBadURI, t)
	}
	if u.Query["pin-source"] != "" && u.Query["pin-value"] != "" {
		return fmt.Errorf("%w: pkcs11 URI has both pin-source and pin-value; give one", ErrBadURI)
	}
	if s := u.Attrs["slot-id"]; s != "" {
		if _, err := strconv.ParseUint(s, 10, 32); err != nil {
			return fmt.Errorf("%w: pkcs11 slot-id=%q must be a decimal number", ErrBadURI, s)
		}
	}
	return nil
}

// PIN returns the PKCS#11 user PIN: the contents of the pin-source file
// (one trailing newline removed) or pin-value. It is an error, not an empty
// PIN, when pin-source cannot be read. A URI with neither returns "".
func (u *URI) PIN() (string, error) {
	if src := u.Query["pin-source"]; src != "" {
		src = strings.TrimPrefix(src, "file:")
		b, err := os.ReadFile(src)
		if err != nil {
			return "", fmt.Errorf("%w: cannot read pin-source %s: %v; check the path and that the service may read it", ErrBadPIN, src, unwrapPathErr(err))
		}
		return strings.TrimRight(string(b), "\r\n"), nil
	}
	return u.Query["pin-value"], nil
}

func unwrapPathErr(err error) error {
	if pe, ok := err.(*os.PathError); ok {
		return pe.Err
	}
	return err
}

// String renders the URI canonically, with any pin-value replaced by
// "REDACTED". It is safe to log.
func (u *URI) String() string { return u.render(true) }

// Secret renders the URI with its pin-value intact, for writing back to a
// config file. Never log it.
func (u *URI) Secret() string { return u.render(false) }

func (u *URI) render(redact bool) string {
	if u.Scheme == SchemeFile {
		return "file:" + (&url.URL{Path: u.Path}).EscapedPath()
	}
	var b strings.Builder
	b.WriteString(u.Scheme + ":")
	b.WriteString(join(u.Attrs, ";", false))
	if len(u.Query) > 0 {
		b.WriteString("?")
		b.WriteString(join(u.Query, "&", redact))
	}
	return b.String()
}

func join(m map[string]string, sep string, redact bool) string {
	names := make([]string, 0, len(m))
	for k := range m {
		names = append(names, k)
	}
	sort.Strings(names)
	parts := make([]string, 0, len(names))
	for _, k := range names {
		v := m[k]
		if redact && k == "pin-value" {
			v = "REDACTED"
		}
		parts = append(parts, k+"="+escapeAttr(v))
	}
	return strings.Join(parts, sep)
}

// escapeAttr percent-encodes what would break the attribute syntax and keeps
// '/' readable in paths.
func escapeAttr(v string) string {
	var b strings.Builder
	for i := 0; i < len(v); i++ {
		c := v[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9',
			c == '-', c == '.', c == '_', c == '~', c == '/', c == ':', c == '@', c == '!', c == '$', c == '\'', c == '(', c == ')', c == '*', c == '+', c == ',':
			b.WriteByte(c)
		default:
			fmt.Fprintf(&b, "%%%02X", c)
		}
	}
	return b.String()
}

// redactRaw hides anything after "pin-value=" in an unparsed URI.
func redactRaw(raw string) string {
	i := strings.Index(strings.ToLower(raw), "pin-value=")
	if i < 0 {
		return raw
	}
	end := strings.IndexAny(raw[i:], "&;")
	tail := ""
	if end >= 0 {
		tail = raw[i+end:]
	}
	return raw[:i] + "pin-value=REDACTED" + tail
}

// StoreID identifies the backend instance holding u's key: keys with equal
// StoreIDs live in the same TPM, token or file system and must share one
// open KeyStore (a swtpm socket, for one, serves a single connection).
func (u *URI) StoreID() string {
	switch u.Scheme {
	case SchemeTPM2:
		p, sock := u.TPMDevice()
		if sock {
			return "tpm2:socket=" + p
		}
		return "tpm2:device=" + p
	case SchemePKCS11:
		return "pkcs11:" + u.Query["module-path"] + "|" + u.Attrs["token"] + "|" + u.Attrs["serial"] + "|" + u.Attrs["slot-id"]
	}
	return u.Scheme
}

// Alternate returns the second key slot beside u, in the same backend: the
// place a new key is made while u's key is still in use (renewal,
// re-provisioning). file: and blob= paths get ".b" before the extension;
// a handle= becomes handle+1; a PKCS#11 object= label gets "-b" and an id=
// a trailing 0x0b byte.
func (u *URI) Alternate() (*URI, error) {
	a := &URI{Scheme: u.Scheme, Path: u.Path, Attrs: map[string]string{}, Query: map[string]string{}}
	for k, v := range u.Attrs {
		a.Attrs[k] = v
	}
	for k, v := range u.Query {
		a.Query[k] = v
	}
	suffix := func(p string) string {
		ext := filepath.Ext(p)
		return strings.TrimSuffix(p, ext) + ".b" + ext
	}
	switch u.Scheme {
	case SchemeFile:
		a.Path = suffix(u.Path)
	case SchemeTPM2:
		if b := u.Attrs["blob"]; b != "" {
			a.Attrs["blob"] = suffix(b)
		}
		if h, _ := u.Handle(); h != 0 {
			if h == 0x81FFFFFF {
				return nil, fmt.Errorf("%w: handle 0x81FFFFFF leaves no room for a second key at handle+1", ErrBadURI)
			}
			a.Attrs["handle"] = fmt.Sprintf("0x%08X", h+1)
		}
	case SchemePKCS11:
		if o := u.Attrs["object"]; o != "" {
			a.Attrs["object"] = o + "-b"
		}
		if id := u.Attrs["id"]; id != "" {
			a.Attrs["id"] = id + "\x0b"
		}
	}
	return a, nil
}
