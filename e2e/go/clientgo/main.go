// Command clientgo checks the aggregated API dhcp.harvesterhci.io/v1alpha1 the way Rancher's
// Steve uses it, with the client library Steve is built on (client-go v0.34, as Harvester
// embeds Steve v0.7.x): discovery, OpenAPI, Table lists and watches, informers in both watch
// modes, and what a user holding only the `view` ClusterRole may do. Run by
// e2e/tests/clientgo.rs, always through kube-apiserver's aggregator.
//
// Usage: clientgo <check> --kubeconfig <file> [flags]. Checks: discovery, openapi, table,
// informers, viewer.
//
// Output protocol (stdout, one line each):
//
//	PASS <check>: <what was seen>
//	FAIL <check>: <what was wrong>
//	STEP <name> [args]   the test must act (create an allocation, restart a replica, ...) and
//	                     answer one line on stdin: "ok [value]" or "error <why>"
//
// The exit code is 1 when any check failed, 2 on a usage error.
package main

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"os"
	"strings"
	"sync"
	"time"

	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/klog/v2"
)

const (
	group   = "dhcp.harvesterhci.io"
	version = "v1alpha1"
)

var (
	gv        = schema.GroupVersion{Group: group, Version: version}
	resources = []string{"ipamallocations", "macaddresses", "dhcpleases"}
	kinds     = map[string]string{
		"ipamallocations": "IPAMAllocation",
		"macaddresses":    "MACAddress",
		"dhcpleases":      "DHCPLease",
	}
)

// report collects the outcome of every check of one run.
type report struct {
	mu     sync.Mutex
	failed bool
}

func (r *report) pass(check, format string, args ...any) {
	r.mu.Lock()
	defer r.mu.Unlock()
	fmt.Printf("PASS %s: %s\n", check, oneLine(fmt.Sprintf(format, args...)))
}

func (r *report) fail(check, format string, args ...any) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.failed = true
	fmt.Printf("FAIL %s: %s\n", check, oneLine(fmt.Sprintf(format, args...)))
}

// check records err as a failure of check; true when there was none.
func (r *report) check(check string, err error) bool {
	if err != nil {
		r.fail(check, "%v", err)
		return false
	}
	return true
}

func oneLine(s string) string {
	return strings.ReplaceAll(s, "\n", " | ")
}

// steps asks the test to act and waits for its answer.
type steps struct {
	mu sync.Mutex
	in *bufio.Scanner
}

func (s *steps) do(name string, args ...string) (string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	fmt.Println(strings.TrimSpace("STEP " + name + " " + strings.Join(args, " ")))
	if !s.in.Scan() {
		return "", fmt.Errorf("step %s: no answer on stdin (%v)", name, s.in.Err())
	}
	answer := strings.TrimSpace(s.in.Text())
	switch {
	case answer == "ok":
		return "", nil
	case strings.HasPrefix(answer, "ok "):
		return strings.TrimPrefix(answer, "ok "), nil
	default:
		return "", fmt.Errorf("step %s: %s", name, answer)
	}
}

type options struct {
	kubeconfig     string
	adminConfig    string
	namespace      string
	otherNamespace string
	pool           string
	timeout        time.Duration
}

func loadConfig(path string) (*rest.Config, error) {
	cfg, err := clientcmd.BuildConfigFromFlags("", path)
	if err != nil {
		return nil, fmt.Errorf("kubeconfig %s: %w", path, err)
	}
	cfg.UserAgent = "vm-dhcp-e2e-clientgo"
	// Steve's defaults are higher than client-go's 5/10; the checks must not be throttled.
	cfg.QPS = 50
	cfg.Burst = 100
	return cfg, nil
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: clientgo discovery|openapi|table|informers|viewer --kubeconfig FILE [flags]")
		os.Exit(2)
	}
	cmd := os.Args[1]
	fs := flag.NewFlagSet(cmd, flag.ExitOnError)
	var o options
	fs.StringVar(&o.kubeconfig, "kubeconfig", "", "kubeconfig of the user the checks run as")
	fs.StringVar(&o.adminConfig, "admin-kubeconfig", "", "kubeconfig of an administrator (viewer: to tell what exists)")
	fs.StringVar(&o.namespace, "namespace", "", "namespace holding the test's pool")
	fs.StringVar(&o.otherNamespace, "other-namespace", "", "a namespace the viewer has no role in")
	fs.StringVar(&o.pool, "pool", "", "the test pool's name")
	fs.DurationVar(&o.timeout, "timeout", 30*time.Second, "how long one expectation may take")
	if err := fs.Parse(os.Args[2:]); err != nil {
		os.Exit(2)
	}
	if o.kubeconfig == "" {
		fmt.Fprintln(os.Stderr, "--kubeconfig is required")
		os.Exit(2)
	}
	cfg, err := loadConfig(o.kubeconfig)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	installGates()
	// CLIENTGO_KLOG_V=4 shows why a reflector listed again (its 410s are logged at 4).
	if v := os.Getenv("CLIENTGO_KLOG_V"); v != "" {
		klogFlags := flag.NewFlagSet("klog", flag.ContinueOnError)
		klog.InitFlags(klogFlags)
		_ = klogFlags.Set("v", v)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	r := &report{}
	st := &steps{in: bufio.NewScanner(os.Stdin)}
	switch cmd {
	case "discovery":
		checkDiscovery(ctx, r, cfg)
	case "openapi":
		checkOpenAPI(ctx, r, cfg, o)
	case "table":
		checkTable(ctx, r, st, cfg, o)
	case "informers":
		checkInformers(ctx, r, st, cfg, o)
	case "viewer":
		checkViewer(ctx, r, cfg, o)
	default:
		fmt.Fprintf(os.Stderr, "unknown check %q\n", cmd)
		os.Exit(2)
	}
	if r.failed {
		os.Exit(1)
	}
}
