{{/* Names ------------------------------------------------------------------------------------ */}}

{{- define "fs.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* <release>-<chart>, or just <release> when it already contains the chart name. */}}
{{- define "fs.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "fs.mlflow.fullname" -}}{{ include "fs.fullname" . }}-mlflow{{- end -}}
{{- define "fs.postgresql.fullname" -}}{{ include "fs.fullname" . }}-postgresql{{- end -}}
{{- define "fs.submit.fullname" -}}{{ include "fs.fullname" . }}-submit{{- end -}}

{{- define "fs.mlflow.serviceAccountName" -}}
{{- default (include "fs.mlflow.fullname" .) .Values.mlflow.serviceAccount.name -}}
{{- end -}}
{{- define "fs.postgresql.serviceAccountName" -}}
{{- default (include "fs.postgresql.fullname" .) .Values.postgresql.serviceAccount.name -}}
{{- end -}}
{{- define "fs.submit.serviceAccountName" -}}
{{- default (include "fs.submit.fullname" .) .Values.submit.serviceAccount.name -}}
{{- end -}}

{{/* In-cluster URL of the tracking server, handed to pipeline runs. */}}
{{- define "fs.mlflow.url" -}}
http://{{ include "fs.mlflow.fullname" . }}.{{ .Release.Namespace }}.svc.cluster.local:{{ .Values.mlflow.service.port }}
{{- end -}}

{{/* Labels ----------------------------------------------------------------------------------- */}}

{{- define "fs.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fs.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Usage: include "fs.labels" (dict "root" $ "component" "mlflow") */}}
{{- define "fs.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "fs.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: feedback-synth
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Images: the references are synced from images/images.yaml (images/sync_images.py). ------ */}}

{{- define "fs.image.cpu" -}}
{{- printf "%s/%s:%s" .Values.images.registry .Values.images.cpu .Values.images.tag -}}
{{- end -}}

{{/* Security: the restricted Pod Security Standard, for every pod and container. ------------ */}}

{{- define "fs.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "fs.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
privileged: false
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* NetworkPolicy egress rule for cluster DNS. */}}
{{- define "fs.networkPolicy.dnsEgress" -}}
- to:
    - namespaceSelector:
        matchLabels:
          {{- toYaml .Values.networkPolicy.dns.namespaceLabels | nindent 10 }}
      podSelector:
        matchLabels:
          {{- toYaml .Values.networkPolicy.dns.podLabels | nindent 10 }}
  ports:
    - protocol: UDP
      port: 53
    - protocol: TCP
      port: 53
{{- end -}}

{{/* A pipeline parameter value on the command line: strings as they are, the rest as JSON. */}}
{{- define "fs.paramValue" -}}
{{- if kindIs "string" . -}}{{ . }}{{- else -}}{{ toJson . }}{{- end -}}
{{- end -}}
